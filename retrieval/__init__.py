"""Similarity indexes over image collections: one interface (retrieval.engine), FAISS folders and Milvus collections.

faiss runs on OpenMP, whose idle threads spin by default. On shared cores that is ruinous: k-means training
of an IVF-PQ index took 3-30x longer here with spinning threads than with passive waiting (6-64 s against
2 s on 30k x 256, depending on the load). The OpenMP runtime reads ``OMP_WAIT_POLICY`` once, when it is
loaded; torch loads its libgomp globally and faiss then shares it, so the setting must be made before torch is
imported: ``mae index ...`` / ``mae search`` do it in ``cli.main``; here it covers programs that import
retrieval first. A value the user set is left alone.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
