"""The knowledge base: files, vector stores, retrieval and the labelled set that measures it."""
