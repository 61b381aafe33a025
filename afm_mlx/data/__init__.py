"""Data: corpora, the tokenizer, the memory-mapped token cache, packed batches, task records
(chat / completion / multiple choice) and the bundled speaker-attribution task."""
