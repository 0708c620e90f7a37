"""Input: corpora, WordPiece vocabularies, instance creation, masking and the grain pipeline."""
