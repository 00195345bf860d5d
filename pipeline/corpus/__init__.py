"""Work over a whole tagged corpus, after tagging: read tables, write new tables.

Near-duplicate signals (duplicate_signals, with hamming_search for phashes and
embedding_search for embeddings) feed dedup's clusters; split builds leakage-free splits
from them and audit checks a split against a train set; export writes captions and JSONL;
report renders one HTML page; ood fits the out-of-distribution reference.
"""
