"""Scaling out on Ray: the server as a Ray Serve deployment (`replica.py`) and bulk reranking of a
first-stage run on Ray Data (`bulk.py`, over the run files of `runfiles.py`).

Ray is an optional extra (`pip install 'rerankd[ray]'`): only the modules that need it import it, and only
`rerankd ray-serve`, `rerankd rerank-batch` (on a cluster) and `serve run` import those, so the base install
never loads it.
"""
