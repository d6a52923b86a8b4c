"""rerankd: an HTTP rerank inference server for cross-encoder rerankers."""

__version__ = "0.1.0"
