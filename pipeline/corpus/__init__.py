"""Work over a whole tagged corpus, after tagging: read tables, write new tables.

Rows come in as narrow columns (corpus_rows) with embeddings read part by part. dedup's
exact signals (duplicate_signals, with hamming_search for phashes) and its embedding
signal (vector_index, the FAISS index; duplicate_index, that index kept between runs;
dedup_vectors, bringing it up to date; embedding_evidence and embedding_threshold, the
threshold and what the search found) give clusters (cluster_table writes them). split
builds leakage-free splits from them (split_columns); audit checks a split against a
train set (audit_sides reads its inputs; audit_vectors and audit_index search eval
embeddings among train ones). export writes captions and JSONL (export_rows,
export_text; supplement merges human tags with the model's); report renders one HTML
page (report_figures counts a part, report_scan keeps each part's counts beside the
table so the next report reads only new parts); ood fits the out-of-distribution
reference; review ranks images for a human look (review_rank the rankings, review_output
the queue file and its page); source_tags, label_settings and label_quality compare
source tags with the model (source_match checks first that the source file speaks of the
table's images); drift compares versions. first_seen finds the version each image first
appeared in (the original among its copies); index_segments codes a dedup run's new
vectors into the index's segments and index_partitions searches them partition by
partition. dedup_settings, split_settings,
audit_settings and export_settings hold what each of those commands takes, one field per
option.
"""
