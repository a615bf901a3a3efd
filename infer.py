"""editx-jax inference: voice cloning and speech editing, wav in, wav out.

    python infer.py demo                                  # tiny random-weight model, no downloads
    python infer.py clone --model DIR --prompt-audio p.wav --prompt-text "..." --text "..." --out out.wav
    python infer.py edit  --model DIR --audio in.wav --audio-text "..." --edit-type emotion --edit-info happy \\
                          --out out.wav [--n-iter 2] [--new-text "... [Laughter] ..."]
    python infer.py --list-edits

`--model` is a folder written by `tools/convert.py editx`. `--random-tiny` (instead of `--model`)
builds random weights from configs/tiny.yaml: the output is noise; it shows the pipeline runs.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

from tqdm import tqdm

from editx_jax import sharding
from editx_jax.audio.io import TOKENIZER_SAMPLE_RATE, AudioError, load_audio, resample, to_mono, trim_silence
from editx_jax.checkpoint import CheckpointError
from editx_jax.cli import (
    OneLineParser,
    UsageError,
    check_output_dir,
    check_output_file,
    check_seed,
)
from editx_jax.config import (
    ConfigError,
    GenerationConfig,
    MeshConfig,
    add_config_args,
    apply_overrides,
    from_dict,
    load_config,
)
from editx_jax.pipeline import EditX, EditXError, Request, validate_request, write_wav
from editx_jax.text.prompts import EditError, list_edits, with_language

GROUPS_PER_SECOND = 25 / 3  # one 2 vq02 + 3 vq06 group of audio ids per 3/25 s (architecture.md §2)
AUDIO_IDS_PER_GROUP = 5

ROOT = pathlib.Path(__file__).resolve().parent
DEMO_CLIP = ROOT / "editx_jax" / "assets" / "demo_prompt.wav"


def _generation_overrides(args) -> dict:
    return {k: getattr(args, k) for k in ("temperature", "top_k", "max_new_tokens") if getattr(args, k) is not None}


def check_arguments(args) -> None:
    """Every argument that can be wrong on its own, before any model loads: one line each
    (UsageError, ConfigError, EditError or AudioError), and nothing is written. The input clip is
    read once here too (cheap next to a model load), so a truncated or too short file fails fast."""
    check_seed(args.seed)
    if getattr(args, "dtype", None) not in (None, "float32", "bfloat16"):
        raise UsageError(f"--dtype must be float32 or bfloat16, got {args.dtype!r}")
    args.mesh_obj = parse_mesh(args.mesh) if getattr(args, "mesh", None) else config_mesh(args)
    if getattr(args, "n_iter", 1) < 1:
        raise UsageError(f"--n-iter must be at least 1, got {args.n_iter}")
    from_dict(GenerationConfig, _generation_overrides(args), "generation")  # --temperature 0, --top-k -1, ...
    if getattr(args, "language", None) is not None:
        with_language("", args.language)  # the prompt rule's own list of languages
    if args.command == "demo":
        check_output_dir(args.out_dir, "--out-dir")
    else:
        check_output_file(args.out)
        wave, sr = load_audio(args.audio if args.command == "edit" else args.prompt_audio, max_seconds=None)
        if args.max_new_tokens is not None:
            check_room_for(wave, sr, args)


def generation_config(args) -> GenerationConfig:
    """The generation settings the model will run with (the model folder's config.json, then --set
    generation.*, then the flags), read without loading any model."""
    if args.model:
        path = pathlib.Path(args.model) / "config.json"
        stored = json.loads(path.read_text()).get("generation", {}) if path.is_file() else {}
        sections = apply_overrides({"generation": stored}, args.overrides)
        return from_dict(GenerationConfig, {**sections["generation"], **_generation_overrides(args)}, "generation")
    config = load_config(args.config, args.overrides + [f"generation.{k}={v}" for k, v in _generation_overrides(args).items()])
    return config.generation


def check_room_for(wave, sample_rate: int, args) -> None:
    """Refuse early a clip whose audio ids alone, with the --max-new-tokens asked for, exceed
    max_length: a lower bound of its ids from its length after the tokenizer's silence trim (2 + 3
    ids per 3/25 s group); the exact count is checked again after tokenizing (EditX)."""
    gen = generation_config(args)
    if gen.max_new_tokens >= gen.max_length:
        return  # as many as fit: capped to the room, never refused
    lower = audio_ids_lower_bound(wave, sample_rate)
    if lower + gen.max_new_tokens > gen.max_length:
        raise UsageError(f"the clip gives at least {lower} prompt tokens, and --max-new-tokens {gen.max_new_tokens} "
                         f"more exceeds max_length {gen.max_length}: ask for at most "
                         f"{max(0, gen.max_length - lower - 1)} new tokens or use a shorter clip")


def audio_ids_lower_bound(wave, sample_rate: int) -> int:
    """At most the audio ids the tokenizer gives this clip: whole groups in its length after the
    silence trim, less 2 for the streaming front ends' edge frames."""
    trimmed = trim_silence(resample(to_mono(wave), sample_rate, TOKENIZER_SAMPLE_RATE), TOKENIZER_SAMPLE_RATE)
    return AUDIO_IDS_PER_GROUP * max(0, int(trimmed.size / TOKENIZER_SAMPLE_RATE * GROUPS_PER_SECOND) - 2)


def config_mesh(args):
    """The config's `mesh:` section over this host's devices (None when that is one device)."""
    try:
        mesh = sharding.make_mesh(load_config(args.config, args.overrides).mesh)
    except ConfigError as e:
        raise UsageError(f"--config {args.config}: {e}") from None
    return None if mesh.size == 1 else mesh


def _load_model(args):
    overrides = _generation_overrides(args)
    t = time.perf_counter()
    if args.model:
        # --set llm.* / generation.* and --dtype apply to the converted model too
        sections = apply_overrides({}, args.overrides)
        llm_overrides = dict(sections.get("llm", {}))
        if args.dtype:
            llm_overrides.update(dtype=args.dtype, param_dtype=args.dtype)
        model = EditX.from_pretrained(args.model, llm_overrides=llm_overrides, mesh=args.mesh_obj,
                                      **{**sections.get("generation", {}), **overrides})
    else:
        config = load_config(args.config, args.overrides + [f"generation.{k}={v}" for k, v in overrides.items()])
        model = EditX.random(config, seed=args.seed, mesh=args.mesh_obj)
    print(f"model ready in {time.perf_counter() - t:.1f} s")
    return model


def _run(model, requests, args, out_paths):
    n_iter = getattr(args, "n_iter", 1)
    bar = tqdm(total=n_iter, desc="editing" if requests[0].edit_type != "clone" else "cloning", unit="round",
               file=sys.stderr, disable=not sys.stderr.isatty())

    tokens = tqdm(desc="generating", unit="step", file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)

    def progress(done, total):
        bar.update(1)

    def token_progress(done, total):  # decode steps of the current round
        if done < tokens.n:
            tokens.reset()
        tokens.total = total
        tokens.update(done - tokens.n)

    results = model.run(requests, n_iter=n_iter, seed=args.seed, progress=progress, token_progress=token_progress)
    tokens.close()
    bar.close()
    for (wave, sr), path in zip(results, out_paths):
        write_wav(path, wave, sr)
        print(f"wrote {path} ({len(wave) / sr:.2f} s at {sr} Hz)")
    info = model.last_info
    t = info["timings"]
    print(f"timing: tokenize {t['tokenize']:.2f} s, generate {t['generate']:.2f} s, decode {t['decode']:.2f} s "
          f"(of which compiling {info['compile_seconds']:.2f} s); "
          f"{sum(info['generated_tokens'])} tokens generated over {info['rounds']} round(s)")
    if info["stray_ids"]:
        print(f"note: {info['stray_ids']} generated ids were not audio tokens ({info['stray_text_ids']} text ids, "
              f"read as the official decoder reads them; {info['stray_past_audio_ids']} past the audio range, "
              f"read as text ids)")


def cmd_clone(args):
    req = Request(args.prompt_audio, args.prompt_text, "clone", new_text=args.text, language=args.language)
    validate_request(req)  # before the model loads: a typo fails in a second
    _run(_load_model(args), [req], args, [args.out])


def cmd_edit(args):
    req = Request(args.audio, args.audio_text, args.edit_type, args.edit_info, args.new_text)
    validate_request(req)
    _run(_load_model(args), [req], args, [args.out])


def cmd_demo(args):
    """The built-in default: tiny random weights, one clone and one edit of the packaged clip."""
    print("random weights: the outputs are noise; this shows the whole pipeline runs (see README.md for "
          "the released weights)")
    model = _load_model(args)
    out = pathlib.Path(args.out_dir)
    _run(model, [Request(str(DEMO_CLIP), "The weather is nice today.", "clone",
                         new_text="What a lovely day it is to speak in a cloned voice.")], args, [out / "clone.wav"])
    _run(model, [Request(str(DEMO_CLIP), "The weather is nice today.", "emotion", "happy")], args,
         [out / "edit_happy.wav"])


def parse_mesh(spec: str):
    """--mesh data=2,tensor=4 -> a device mesh (axes not named are 1); UsageError naming the problem."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for item in spec.split(","):
        name, _, value = (part.strip() for part in item.partition("="))
        if name not in sizes:
            raise UsageError(f"--mesh: unknown axis {name!r} (use data, fsdp, tensor)")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise UsageError(f"--mesh: expected e.g. data=2,tensor=4, got {spec!r}") from None
    try:
        return sharding.make_mesh(MeshConfig(**sizes))
    except ConfigError as e:
        raise UsageError(f"--mesh {spec}: {e}") from None


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="infer.py", description=__doc__.split("\n")[0])
    parser.add_argument("--list-edits", action="store_true", help="print every supported edit type and value")
    sub = parser.add_subparsers(dest="command")

    def common(p, default_config="configs/tiny.yaml"):
        src = p.add_mutually_exclusive_group()
        src.add_argument("--model", help="model folder written by tools/convert.py editx")
        src.add_argument("--random-tiny", action="store_true", help="random weights from --config (noise)")
        add_config_args(p, default=str(ROOT / default_config))
        p.add_argument("--seed", type=int, default=0, help="sampling seed, an integer in [0, 2^32)")
        p.add_argument("--temperature", type=float)
        p.add_argument("--top-k", type=int)
        p.add_argument("--max-new-tokens", type=int)
        p.add_argument("--dtype", help="LLM weights and compute: float32 or bfloat16 (default: the model's)")
        p.add_argument("--mesh", help="devices for the LLM and the decoder, e.g. data=2,tensor=4 (axes data, fsdp, tensor; "
                                      "default: the --config's mesh section)")

    p = sub.add_parser("clone", help="speak new text in the voice of a prompt clip")
    common(p)
    p.add_argument("--prompt-audio", required=True)
    p.add_argument("--prompt-text", required=True, help="transcript of the prompt clip")
    p.add_argument("--text", required=True, help="the text to speak")
    p.add_argument("--language", help="Sichuanese, Cantonese, Japanese or Korean (Mandarin/English: none)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_clone)

    p = sub.add_parser("edit", help="edit emotion, style, speed, paralinguistics, noise or silence")
    common(p)
    p.add_argument("--audio", required=True)
    p.add_argument("--audio-text", help="transcript of the clip (not needed for denoise / vad)")
    p.add_argument("--edit-type", required=True)
    p.add_argument("--edit-info", help="the value, e.g. happy, whisper, faster")
    p.add_argument("--new-text", help="paralinguistic: the transcript with tags, e.g. 'Hi [Laughter] there'")
    p.add_argument("--n-iter", type=int, default=1, help="edit rounds, each on the previous output")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("demo", help="tiny random-weight model: one clone and one edit of a packaged clip")
    common(p)
    p.add_argument("--out-dir", default="outputs/demo")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_edits:
        print(list_edits())
        return 0
    if not args.command:
        parser.print_help()
        return 2
    if args.command != "demo" and not args.model and not args.random_tiny:
        print("error: give --model DIR (tools/convert.py editx writes one) or --random-tiny", file=sys.stderr)
        return 1
    try:
        check_arguments(args)
    except (UsageError, ConfigError, EditError, AudioError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        args.func(args)
    except (EditXError, EditError, AudioError, ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
