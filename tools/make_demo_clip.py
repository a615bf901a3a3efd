"""Write editx_jax/assets/demo_prompt.wav: 2.5 s of a synthetic voice-like sound (16 kHz, mono).

A glottal pulse train with a slowly gliding pitch through three vowel formant resonators, with
short pauses: enough structure for the tokenizer's silence trim and front ends to do real work.
It is not speech; it is the package's own test audio, so the demo needs no download.
"""

import pathlib

import numpy as np
import soundfile as sf
from scipy.signal import lfilter

SR = 16000
OUT = pathlib.Path(__file__).resolve().parents[1] / "editx_jax" / "assets" / "demo_prompt.wav"
VOWELS = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480)]  # a, i, u, e


def resonator(x, freq, bandwidth):
    r = np.exp(-np.pi * bandwidth / SR)
    return lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * freq / SR), r * r], x)


def main():
    rng = np.random.default_rng(0)
    pieces = [np.zeros(int(0.25 * SR))]
    for i, formants in enumerate(VOWELS):
        n = int(0.4 * SR)
        f0 = 120 + 25 * np.sin(np.linspace(0, np.pi, n) + i)
        phase = np.cumsum(f0 / SR)
        pulses = (np.diff(np.floor(phase), prepend=0) > 0).astype(float) + 0.02 * rng.standard_normal(n)
        voice = sum(resonator(pulses, f, 80 + 40 * k) for k, f in enumerate(formants))
        pieces += [voice * np.hanning(n), np.zeros(int(0.1 * SR))]
    pieces.append(np.zeros(int(0.25 * SR)))
    wave = np.concatenate(pieces)
    wave = 0.5 * wave / np.abs(wave).max()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    sf.write(OUT, wave.astype(np.float32), SR, subtype="PCM_16")
    print(f"wrote {OUT} ({len(wave) / SR:.2f} s)")


if __name__ == "__main__":
    main()
