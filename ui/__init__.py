"""The Gradio chat. Calls only the library (ingest) and assistant APIs."""
