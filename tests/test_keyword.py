"""The keyword index on its own: the analyzer in every script, BM25 ranking by hand, the document
and kind filters, incremental writes, persistence and the consistency manifest (real Tantivy on disk)."""

import math
import shutil
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from index.keyword import KeywordIndex, _tokens, tokenize

A, B = "a" * 64, "b" * 64


# ---- the analyzer --------------------------------------------------------------------------------
def test_code_tokens_stay_whole_and_stop_words_go():
    assert tokenize("How do I set the M4PATH env-var, set_size and v1.2.3?") == [
        "set", "m4path", "env-var", "set_size", "v1.2.3"]
    assert tokenize("C++ and gcc-12: x+y") == ["c", "gcc-12", "x+y"]


def test_nfkc_and_case_folding_make_forms_of_a_word_one_token():
    # ligatures, full-width Latin, German sharp s, Greek final sigma, a compatibility digit
    assert tokenize("e\ufb03cient \ufb01lter \ufb02ow") == ["efficient", "filter", "flow"]
    assert tokenize("ＭＥＭＯＲＹ　Ｌｉｍｉｔ") == ["memory", "limit"]
    assert tokenize("STRASSE straße") == ["strasse", "strasse"]
    assert tokenize("ΟΔΟΣ οδος") == ["οδοσ", "οδοσ"]
    assert tokenize("x² H₂O") == ["x2", "h2o"]
    # accents of Latin and Greek letters fold away (questions leave them out; Greek capitals drop the tonos)
    assert tokenize("Café CAFÉ cafe") == ["cafe", "cafe", "cafe"]
    assert tokenize("ΚΩΔΙΚΟ κωδικό") == ["κωδικο", "κωδικο"]
    assert tokenize("हिन्दी") == ["हिन्दी"]  # other scripts' marks are parts of their letters


def test_words_of_every_script_are_tokens():
    assert tokenize("Введите пароль.") == ["введите", "пароль"]
    assert tokenize("Η μπαταρία λιθίου") == ["η", "μπαταρια", "λιθιου"]  # without accents (see below)
    assert tokenize("كلمة المرور") == ["كلمة", "المرور"]
    # Devanagari vowel signs and virama are combining marks: still inside the word
    assert tokenize("हिन्दी पासवर्ड") == ["हिन्दी", "पासवर्ड"]


def test_text_without_spaces_becomes_bigrams():
    assert tokenize("锂电池保养") == ["锂电", "电池", "池保", "保养"]
    assert tokenize("パスワードを変更") == ["パス", "スワ", "ワー", "ード", "ドを", "を変", "変更"]
    assert tokenize("猫") == ["猫"]
    # mixed with Latin inside one word: the Latin part is a token of its own
    assert tokenize("USB接口") == ["usb", "接口"]
    # Korean: spaced words carry particles (비밀번호를 = password + object particle), so bigrams
    assert tokenize("비밀번호를 입력") == ["비밀", "밀번", "번호", "호를", "입력"]
    assert set(tokenize("비밀번호")) <= set(tokenize("네트워크 설정: 비밀번호를 입력하십시오."))
    # a question in Chinese shares the document's bigrams
    assert set(tokenize("锂电池怎么保养")) & set(tokenize("第三章 锂电池保养。")) == {"锂电", "电池", "保养"}


def test_very_long_tokens_are_dropped():
    assert tokenize("x" * 101 + " ok") == ["ok"]
    assert tokenize("y" * 100) == ["y" * 100]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("aZ9 _.-+,é\u0301\u093f\u0915ΣςДж锂电池パ\ufb01²\u3000")), max_size=40))
def test_the_shortcuts_agree_with_the_general_rule(text):
    assert tokenize(text) == _tokens(unicodedata.normalize("NFKC", text).casefold())


# ---- the index -----------------------------------------------------------------------------------
def bm25(tf: int, dl: int, avgdl: float, n: int, df: int, k1: float = 1.2, b: float = 0.75) -> float:
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    return idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl))


@pytest.fixture
def kw(tmp_path):
    index = KeywordIndex(tmp_path / "kw")
    index.add(["a", "b", "c", "d"],
              ["pump pump filter", "pump valve gasket seal housing", "the filter", "valve gasket"],
              [A, A, B, B], ["text", "vector", "text", "table"])
    index.commit([A, B])
    return index


def test_bm25_ranking_by_hand(kw):
    # 4 items, 11 tokens ("the" is a stop word): avgdl 2.75; "pump" and "filter" are in 2 items each
    avg = 11 / 4
    want = {"a": bm25(2, 3, avg, 4, 2) + bm25(1, 3, avg, 4, 2), "b": bm25(1, 5, avg, 4, 2), "c": bm25(1, 1, avg, 4, 2)}
    got = kw.search("Which pump filter?", 10)
    assert [i for i, _ in got] == ["a", "c", "b"]  # tf 2 beats tf 1; a short item beats a long one
    assert dict(got) == pytest.approx(want, rel=1e-4)
    assert kw.search("gasket", 1) == [("d", pytest.approx(bm25(1, 2, avg, 4, 2), rel=1e-4))]
    assert kw.search("the of and", 10) == [] and kw.search("unknownword", 10) == []


def test_document_and_kind_filters(kw):
    assert [i for i, _ in kw.search("pump filter", 10, docs=[A])] == ["a", "b"]
    assert [i for i, _ in kw.search("pump filter", 10, docs=[B])] == ["c"]
    assert [i for i, _ in kw.search("pump filter", 10, docs=[A, B, "0" * 64])] == ["a", "c", "b"]
    assert kw.search("pump filter", 10, docs=["0" * 64]) == [] and kw.search("pump", 10, docs=[]) == []
    assert [i for i, _ in kw.search("pump filter gasket", 10, kinds=["text"])] == ["a", "c"]
    assert [i for i, _ in kw.search("pump filter gasket", 10, docs=[B], kinds=["table", "vector"])] == ["d"]
    # asked for most of what it holds, it excludes the rest instead: the same answer
    C = "c" * 64
    kw.add(["e"], ["pump filter pump"], [C], ["text"])
    kw.commit([C])
    assert [i for i, _ in kw.search("pump filter", 10, docs=[A, B])] == ["a", "c", "b"]
    assert [i for i, _ in kw.search("pump filter", 10, docs=[A, C])] == ["a", "e", "b"]
    assert [i for i, _ in kw.search("pump filter", 10, docs=[C])] == ["e"]
    # a filter does not change scores: the same BM25 as unfiltered
    assert dict(kw.search("pump filter", 10, docs=[B])) == pytest.approx({"c": dict(kw.search("pump filter", 10))["c"]})


def test_writes_are_visible_at_commit_and_persist(kw, tmp_path):
    kw.add(["e"], ["pump pump pump"], ["e" * 64], ["text"])
    assert "e" not in dict(kw.search("pump", 10))  # queued, not committed
    kw.commit(["e" * 64])
    assert kw.search("pump", 1)[0][0] == "e"
    kw.delete_doc(A)
    assert "a" in dict(kw.search("pump", 10))
    kw.commit()
    assert sorted(dict(kw.search("pump filter", 10))) == ["c", "e"]
    assert kw.documents() == {B, "e" * 64} and kw.ids() == {"c", "d", "e"}
    kw.add(["f"], ["filter filter"], [A], ["text"])
    kw.rollback()
    assert kw.ids() == {"c", "d", "e"}
    again = KeywordIndex(tmp_path / "kw")  # another process opening the same directory
    assert again.ids() == {"c", "d", "e"} and again.search("filter", 1)[0][0] == "c"
    # filled without a full build first, so it does not claim to hold everything (a library
    # always builds, possibly from nothing, before its first write)
    assert not again.covers([B, "e" * 64])


def test_a_writer_killed_inside_tantivys_commit_leaves_an_index_that_takes_writes(kw, tmp_path):
    """kill -9 after Tantivy wrote a commit's files but before it published meta.json (seen in
    test_reliability's kill during a remove): the next process's same delete got the same opstamp,
    so the same file name, and every later write failed with FileAlreadyExists."""
    path = tmp_path / "kw"
    before = {name: (path / name).read_bytes() for name in ("meta.json", KeywordIndex.MANIFEST)}
    kw.delete_doc(A)
    kw.commit()
    assert any(p.suffix == ".del" for p in path.iterdir())
    for name, data in before.items():  # the state the kill leaves: new files, old meta.json
        (path / name).write_bytes(data)
    again = KeywordIndex(path)  # the next process, doing the same remove
    assert again.ids() == {"a", "b", "c", "d"}
    again.delete_doc(A)
    again.commit()
    assert again.ids() == {"c", "d"} and [i for i, _ in again.search("pump filter", 10)] == ["c"]
    again.add(["e"], ["pump"], ["e" * 64], ["text"])
    again.commit(["e" * 64])
    assert KeywordIndex(path).ids() == {"c", "d", "e"}


def test_an_id_added_twice_is_one_item(tmp_path):
    kw = KeywordIndex(tmp_path / "kw")
    kw.add(["x", "x"], ["old words", "new words"], [A, A], ["text", "text"])
    kw.commit([A])
    assert kw.ids() == {"x"} and kw.search("old", 5) == [] and kw.search("new", 5)[0][0] == "x"


def test_covers_is_false_until_a_build_finished(tmp_path, kw):
    fresh = KeywordIndex(tmp_path / "new")
    assert not fresh.covers([]) and fresh.search("pump", 5) == []  # nothing on disk yet
    assert fresh.rebuild([(["a"], ["pump"], [A], ["text"])], [A]) == 1
    assert fresh.covers([A]) and not fresh.covers([A, B])
    # a rebuild cut short leaves the index marked unfinished
    def broken():
        yield ["a"], ["pump"], [A], ["text"]
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        fresh.rebuild(broken(), [A])
    assert not KeywordIndex(tmp_path / "new").covers([A])
    # deleted by hand: not covered, searches find nothing instead of failing
    shutil.rmtree(tmp_path / "kw")
    gone = KeywordIndex(tmp_path / "kw")
    assert not gone.covers([A, B]) and gone.search("pump", 5) == []
