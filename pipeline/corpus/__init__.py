"""Work over a whole tagged corpus, after tagging: read tables, write new tables.

Near-duplicate signals (duplicate_signals, with hamming_search for phashes and
embedding_search for embeddings) feed dedup's clusters; split builds leakage-free splits
from them and audit checks a split against a train set; export writes captions and JSONL
(supplement merges human tags with the model's); report renders one HTML page; ood fits
the out-of-distribution reference; review ranks images for a human look (review_rank the
rankings, review_output the queue file and its page).
"""
