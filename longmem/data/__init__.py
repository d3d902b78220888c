"""Real text for training and evaluation: fetch and split it (`prepare`), read it back
(`load_documents`, `load_labelled`) and train the default tokenizer (`train_tokenizer`)."""
