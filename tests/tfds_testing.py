"""A tiny TFDS dataset for tests, built locally (nothing downloads): `mlm_tiny_text`."""

import numpy as np
import tensorflow_datasets as tfds

NAME = "mlm_tiny_text"
NUM_TRAIN = 40
NUM_TEST = 7
NUM_SHARDS = 3
FORMATS = ("tfrecord", "array_record")
WORDS = ("river", "stone", "light", "garden", "window", "paper", "music", "winter", "market")
WORDS += ("city", "north", "bridge", "forest", "letter", "summer", "table", "school", "island")


def document_text(index):
    """A small article: a heading line, then paragraphs of several sentences (some accented)."""
    rng = np.random.default_rng(index)

    def sentence():
        words = [str(word) for word in rng.choice(WORDS, size=int(rng.integers(3, 9)))]
        if rng.random() < 0.2:
            words.append("café")
        return " ".join(words).capitalize() + "."

    paragraphs = [f"Article {index}"]
    for _ in range(int(rng.integers(1, 4))):
        paragraphs.append("  " + " ".join(sentence() for _ in range(int(rng.integers(1, 5)))))
    return "\n\n".join(paragraphs) + "\n"


class MlmTinyText(tfds.core.GeneratorBasedBuilder):
    """Documents with an id, a title and a text, like TFDS's wikipedia."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"id": np.int64, "title": tfds.features.Text(), "text": tfds.features.Text()}
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            "train": self._generate_examples(0, NUM_TRAIN),
            "test": self._generate_examples(1000, NUM_TEST),
        }

    def _generate_examples(self, first, count):
        for index in range(first, first + count):
            yield index, {"id": index, "title": f"Doc {index}", "text": document_text(index)}


def build_tiny_text(data_dir: str, file_format: str) -> str:
    """Prepares `mlm_tiny_text` in `data_dir` in one file format; returns the data dir."""
    builder = MlmTinyText(data_dir=data_dir, file_format=file_format)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=NUM_SHARDS)
    )
    return data_dir
