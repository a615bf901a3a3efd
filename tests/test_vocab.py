"""The audio id range is defined once, in editx_jax/vocab.py; what restates it must agree."""

import numpy as np
import pytest

from editx_jax import vocab
from editx_jax.config import DataConfig
from editx_jax.data.jsonl import RecordError, _audio_ids
from editx_jax.text import tiny


def test_config_defaults_restate_vocab():
    """config.py may import nothing of ours, so DataConfig restates the range: it must be vocab's."""
    assert DataConfig().audio_id_base == vocab.AUDIO_ID_OFFSET
    assert DataConfig().audio_codes == vocab.AUDIO_TOKENS
    assert tiny.VOCAB_SIZE > vocab.AUDIO_ID_END


def test_jsonl_reads_record_ids_from_vocab_offset():
    cfg = DataConfig()
    ids = [vocab.AUDIO_ID_OFFSET, vocab.AUDIO_ID_END - 1]
    np.testing.assert_array_equal(_audio_ids({"a": ids}, "a", cfg, tiny.VOCAB_SIZE), ids)
    for bad in (vocab.AUDIO_ID_OFFSET - 1, vocab.AUDIO_ID_END):
        with pytest.raises(RecordError, match=rf"\[{vocab.AUDIO_ID_OFFSET}, {vocab.AUDIO_ID_END}\)"):
            _audio_ids({"a": [bad]}, "a", cfg, tiny.VOCAB_SIZE)
