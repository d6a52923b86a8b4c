"""One module per rerank dialect clients already speak; each only translates to and from the one rerank path
(`rerankd.api.service`)."""
