"""Raw dataset files -> TFRecord shards.

`readers/` turn each format datasets ship in into one `records.SourceDataset`;
`synthetic` generates the embedded dataset; `build_shards` writes vocabulary,
word2vec init and shards from any source.
"""
