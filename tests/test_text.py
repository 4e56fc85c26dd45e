from ingest.text import chunk_blocks, clean_block_text, drop_running, reading_order, running_lines


def test_two_column_page_reads_left_column_before_right():
    blocks = [("R1", (320, 100, 540, 200)), ("L1", (72, 100, 290, 200)), ("L2", (72, 210, 290, 300)),
              ("R2", (320, 210, 540, 300)), ("Title", (72, 50, 540, 80))]
    assert [t for t, _ in reading_order(blocks, 612)] == ["Title", "L1", "L2", "R1", "R2"]


def test_single_column_reads_top_to_bottom():
    blocks = [("b", (72, 300, 540, 320)), ("a", (72, 100, 540, 120))]
    assert [t for t, _ in reading_order(blocks, 612)] == ["a", "b"]


def test_running_headers_and_page_numbers_are_dropped():
    pages = [["My Manual — Chapter 1", str(i)] for i in range(10)]
    running = running_lines(pages, 10)
    blocks = [("My Manual — Chapter 1", (72, 20, 300, 30)), ("Body text here", (72, 100, 500, 200)),
              ("7", (300, 770, 310, 780))]
    assert [t for t, _ in drop_running(blocks, 792, running)] == ["Body text here"]


def test_margin_text_that_does_not_repeat_is_kept():
    blocks = [("A unique remark at the top of one page", (72, 20, 400, 30))]
    assert drop_running(blocks, 792, running_lines([["x"]] * 5, 5)) == blocks


def test_hyphenated_line_ends_are_joined():
    assert clean_block_text("recog-\nnised as a vec-\ntor figure") == "recognised as a vector figure"


def test_chunks_respect_size_and_overlap():
    words = " ".join(f"word{i}" for i in range(400))
    chunks = chunk_blocks([(words, (0, 0, 10, 10))], size=200, overlap=40)
    assert len(chunks) > 5
    assert all(len(t) <= 200 for t, _ in chunks)
    for (a, _), (b, _) in zip(chunks, chunks[1:]):  # consecutive chunks share words
        assert a.split()[-1] in b.split()[:12]
    rebuilt = set(" ".join(t for t, _ in chunks).split())
    assert rebuilt == set(words.split())  # nothing lost


def test_chunk_bbox_is_union_of_its_blocks():
    chunks = chunk_blocks([("one", (10, 10, 20, 20)), ("two", (30, 40, 50, 60))], size=100, overlap=0)
    assert chunks == [("one two", (10, 10, 50, 60))]
