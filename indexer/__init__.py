"""The vector store: FAISS (+ GPU search copy) and a transactional SQLite catalog."""
