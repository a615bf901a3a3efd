"""The 2:3 interleave of vq02 / vq06, the `<audio_N>` string, and the inverse for the decoder."""

import numpy as np
import pytest
from conftest import fixture_dirs

from editx_jax.parity import check_fixture
from editx_jax.codes import (AudioTokenError, get_audio_tokens, interleave_codes, interleave_ids,
                             merge_vq0206_to_token_str, num_groups, split_ids)


@pytest.mark.parametrize("path", fixture_dirs("dual_codebook_interleave"), ids=lambda p: p.name)
def test_parity(path):
    result = check_fixture(path)
    assert result.status == "PASS", result.line()


def test_group_layout_and_offsets():
    vq02 = [1, 2, 3, 4, 5]  # 5 -> trailing, dropped
    vq06 = [10, 11, 12, 13, 14, 15, 16]  # 16 -> trailing, dropped
    assert interleave_ids(vq02, vq06).tolist() == [65537, 65538, 66570, 66571, 66572,
                                                   65539, 65540, 66573, 66574, 66575]
    assert merge_vq0206_to_token_str([0, 1023], [0, 1, 4095]) == "<audio_0><audio_1023><audio_1024><audio_1025><audio_5119>"


@pytest.mark.parametrize("n02,n06,groups", [(0, 0, 0), (1, 3, 0), (2, 2, 0), (2, 3, 1), (3, 3, 1), (9, 100, 4),
                                            (100, 8, 2)])
def test_short_streams_drop_leftovers(n02, n06, groups):
    rng = np.random.default_rng(n02 * 1000 + n06)
    vq02, vq06 = rng.integers(0, 1024, n02), rng.integers(0, 4096, n06)
    assert num_groups(n02, n06) == groups
    ids = interleave_ids(vq02, vq06)
    assert ids.shape == (5 * groups,) and ids.dtype == np.int64
    text = merge_vq0206_to_token_str(vq02, vq06)
    assert text.count("<audio_") == 5 * groups
    np.testing.assert_array_equal(get_audio_tokens(text), ids)


def test_inverse_round_trip():
    rng = np.random.default_rng(0)
    vq02, vq06 = rng.integers(0, 1024, 40), rng.integers(0, 4096, 60)
    ids = interleave_ids(vq02, vq06)
    a, b = split_ids(ids)
    np.testing.assert_array_equal(a, vq02)
    np.testing.assert_array_equal(b, vq06)
    a, b = split_ids(interleave_codes(vq02, vq06), offset=0)  # the vocoder's prompt values (ids - 65536)
    np.testing.assert_array_equal(a, vq02)
    np.testing.assert_array_equal(b, vq06)
    a, b = split_ids([])
    assert a.shape == (0,) and b.shape == (0,)


def test_inverse_rejects_bad_ids():
    ids = interleave_ids([1, 2], [3, 4, 5]).tolist()
    with pytest.raises(AudioTokenError, match="whole number"):
        split_ids(ids[:4])
    with pytest.raises(AudioTokenError, match="position 2 is not a vq06 id"):
        split_ids(ids[:2] + [65540] + ids[3:])  # a vq02 id where a vq06 one belongs
    with pytest.raises(AudioTokenError, match="position 0 is not a vq02 id"):
        split_ids([12] + ids[1:])  # a text id
    with pytest.raises(AudioTokenError, match="1-D"):
        split_ids(np.zeros((2, 5), np.int64))


def test_bad_codes_and_strings():
    with pytest.raises(AudioTokenError, match="vq02 code 1024 at index 1"):
        interleave_ids([0, 1024], [0, 0, 0])
    with pytest.raises(AudioTokenError, match="vq06 code -1"):
        interleave_ids([0, 1], [0, -1, 0])
    with pytest.raises(AudioTokenError, match="integer"):
        interleave_ids([0.5, 1.0], [0, 1, 2])
    with pytest.raises(AudioTokenError, match="character 10"):
        get_audio_tokens("<audio_12> <audio_13>")
    with pytest.raises(AudioTokenError, match="outside"):
        get_audio_tokens("<audio_5120>")
    with pytest.raises(AudioTokenError, match="string"):
        get_audio_tokens(None)
    assert get_audio_tokens("").shape == (0,)
