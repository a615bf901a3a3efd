"""A TFDS builder over upstream JSONL: the same encoded examples as training, as an ArrayRecord TFDS
dataset readable with `tfds.data_source` (random access, no TensorFlow needed).

    build_tfds(cfg, data_dir, train="train.jsonl", validation="eval.jsonl")
    src = TfdsExamples(data_dir, "train")          # a random-access source of `Example`s
    dataset.train_dataset(src, cfg.data, rows)

Each example: `tokens` int32 [n] and `loss_mask` bool [n] (chat layout, loss mask and truncation of
`jsonl.encode_record` with the given config).
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from editx_jax.config import Config
from editx_jax.data import jsonl
from editx_jax.data.jsonl import Example

NAME = "editx_sft"


def _builder_class(cfg: Config, files: dict, tokenizer):
    class EditxSft(tfds.core.GeneratorBasedBuilder):
        """Step-Audio-EditX SFT examples (token ids + loss mask) from upstream JSONL."""

        name = NAME
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, description=__doc__, features=tfds.features.FeaturesDict({
                "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "loss_mask": tfds.features.Tensor(shape=(None,), dtype=np.bool_)}))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(path) for split, path in files.items()}

        def _generate_examples(self, path):
            examples, report = jsonl.read_examples(path, tokenizer, cfg.data, cfg.llm.vocab_size)
            print(f"{path}: {report.summary()}")
            for i, ex in enumerate(examples):
                yield i, {"tokens": ex.tokens.astype(np.int32), "loss_mask": ex.loss_mask.astype(bool)}

    # TFDS looks for a builder's metadata files beside its module, and for a class defined in a
    # package that path lookup needs the `importlib_resources` backport; a one-part module name makes
    # TFDS skip the lookup (the builder has no metadata files anyway).
    EditxSft.__module__ = NAME
    return EditxSft


def build_tfds(cfg: Config, data_dir, train: str, validation: str | None = None, tokenizer=None) -> str:
    """Encode the JSONL split(s) into an ArrayRecord TFDS dataset under `data_dir`; returns its path."""
    files = {"train": train, **({"validation": validation} if validation else {})}
    tok = tokenizer or jsonl.load_text_tokenizer(cfg.data.text_tokenizer)
    builder = _builder_class(cfg, files, tok)(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_path)


class TfdsExamples:
    """`tfds.data_source(editx_sft)` split as a random-access source of `Example`s."""

    def __init__(self, data_dir, split: str = "train"):
        self.source = tfds.data_source(NAME, data_dir=str(data_dir), split=split)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i) -> Example:
        row = self.source[i]
        return Example(np.asarray(row["tokens"], np.int32), np.asarray(row["loss_mask"], bool))
