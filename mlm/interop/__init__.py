"""Moving BERT weights between mlm and the rest of the ecosystem.

`layout` is the one table between mlm's parameter tree and BERT's published tensor names;
`hf` reads and writes Hugging Face model directories; `tf_bert` reads checkpoints of the original
google-research/bert release. `python -m mlm.convert` is the command line over them.
"""
