"""dual-path: Dual-Path Convolutional Image-Text Embeddings with Instance Loss.

Data flows through the modules in this order:
`text` (tokens and vocabulary) -> `shard_format` (what a TFRecord shard holds) ->
`input_pipeline` (tf.data batches) -> model -> losses -> training -> evaluation -> export.
"""
