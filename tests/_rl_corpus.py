"""A synthetic preference task over token units for the reward-model / DPO / GRPO / PPO tests.

Vocabulary of 64 ids: BOS 1, <|EOT|> 3, instructions HAPPY 5 / SAD 6, separator 7, source codes
[8, 16), the happy band [16, 24) (code + 8) and the sad band [24, 32) (code + 16). A prompt is
[BOS, instruction, SEP, source codes..., SEP]; the exact edit moves every source code into the band the
instruction names, then <|EOT|>. A near miss is the exact edit with one unit moved into the other band.
"""

import numpy as np

from editx_jax.config import LLMConfig

BOS, EOT, HAPPY, SAD, SEP = 1, 3, 5, 6, 7
CODE0, NCODES = 8, 8
BAND = {HAPPY: 8, SAD: 16}
TINY = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_groups=2, num_layers=2,
                 max_seq_len=256)


def edit(src, instr):
    return [c + BAND[instr] for c in src]


def make_prompts(n, seed, lengths=(3, 7)):
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        instr = (HAPPY, SAD)[i % 2]
        src = (CODE0 + rng.permutation(NCODES)[:rng.randint(*lengths)]).tolist()
        out.append((instr, src))
    return out


def prompt_ids(instr, src):
    return [BOS, instr, SEP] + list(src) + [SEP]


def make_pairs(n, seed):
    """(prompts, chosen, rejected): chosen = exact edit + EOT; rejected = a near miss + EOT."""
    rng = np.random.RandomState(seed + 1000)
    prompts, chosen, rejected = [], [], []
    for instr, src in make_prompts(n, seed):
        good = edit(src, instr)
        bad = list(good)
        k = rng.randint(len(bad))
        other = SAD if instr == HAPPY else HAPPY
        bad[k] = src[k] + BAND[other]
        prompts.append(prompt_ids(instr, src))
        chosen.append(good + [EOT])
        rejected.append(bad + [EOT])
    return prompts, chosen, rejected


def in_band_reward(prompts, completions, records):
    """The share of response tokens (before <|EOT|>) in the band the instruction names; 0 if empty."""
    out = []
    for p, c in zip(prompts, completions):
        body = c[:c.index(EOT)] if EOT in c else c
        lo = CODE0 + BAND[p[1]]
        out.append(sum(lo <= t < lo + NCODES for t in body) / len(body) if body else 0.0)
    return out
