"""FAISS similarity indexes over image collections."""
