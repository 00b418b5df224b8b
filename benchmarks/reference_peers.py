"""unmask against the reference implementations, on identical weights: decoding speed side by side.

A random LLaDA-shaped model (hidden 512, 4 blocks, 8 heads, MLP 1536, vocabulary 32,000) and a
Dream/Qwen2-shaped one (the same with grouped-query attention 8/2, q/k/v biases, the logit shift) are
written by unmask in the released layouts; each side loads them with its own code: the reference's
model classes (the copies Fast-dLLM vendors, as the reference vectors used) and samplers read from local
checkouts given by flags (fetched by the user, never vendored), unmask through ``from_pretrained``. So are
an SDAR-shaped model (Qwen3 with blocks: the same sizes, grouped-query attention 8/2 with heads of 64,
query/key norms) and a LLaDA2-shaped one (Ling 2.0's MoE: the same attention with half of each head
rotated, 16 routed experts of 256 (top 4 from the best 2 of 4 groups, scale 2.5) and one shared expert,
the first layer dense), written by unmask in SDAR's and LLaDA2's released layouts (``sdar``, ``llada2``)
and loaded by those references' own model classes.

Cases (temperature 0, ``--prompt`` prompt tokens, ``--gen`` generated, blocks of ``--block``, one token per
step unless a threshold reveals more):

* ``llada`` (ML-GSAI/LLaDA ``generate.py``), batch 1 and ``--batch``;
* ``fast-dllm`` / ``fast-dllm-prefix`` / ``fast-dllm-dual`` (NVlabs/Fast-dLLM ``llada/generate.py``: ``generate``,
  ``generate_with_prefix_cache``, ``generate_with_dual_cache``), each without and with ``threshold=0.9``;
  batch 1 only (those functions build a canvas of one row);
* ``dream`` (Fast-dLLM's ``dream/model/generation_utils.py``, Dream's ``diffusion_generate``, ``alg=entropy``),
  batch 1 and ``--batch``;
* ``dream-block-prefix`` / ``dream-block-dual`` (Fast-dLLM's ``generation_utils_block.py``, bound onto the
  model as its ``dream/eval.py`` does; ``alg=confidence_threshold``, ``threshold=0.9``), batch 1 only: it
  reveals tokens in row 0 alone (``transfer_index[0, ...]``), so at two rows it never finishes a block;
* ``bd3lm`` / ``mdlm`` (kuleshov-group/bd3lms ``diffusion.py``, ``Diffusion._semi_ar_sampler`` with its default
  sampling settings: first-hitting, no KV cache; ``algo=bd3lm`` in blocks of ``--block``, ``algo=mdlm`` one
  block) on a random MDLM-style DiT of the same width (MLP 4x), unmask's ``first_hitting`` sampler
  (``kv_cache=false`` for BD3-LM). The reference starts every row with BOS and generates the ``--gen`` - 1
  positions after it, one token per call; batch 1 only (it reads the masked count with ``.item()``, and its
  KV cache is allocated on CUDA in bfloat16, so it is not run here). It has no temperature-0 mode and draws
  from the global generator: these cases are *sampled*, checked by NFE and by every position being revealed
  instead of equal tokens (the forward itself is proven equal to bd3lms' by the ``bd3lm_loss`` vectors);
* ``sdar`` (JetAstra/SDAR ``generate.py``, ``block_diffusion_generate`` on its ``SDARForCausalLM`` of
  ``training/model/SDAR-4B-Chat/``) with its default decoding: ``low_confidence_dynamic``, threshold 0.85,
  temperature 1, no top-k/top-p, ``denoising_steps`` = ``--block`` (at least one token per step), no
  stopping token, its exact KV cache; against unmask's ``sdar`` sampler with the same keys
  (``strategy=dynamic``, ``commit_calls=separate``: the prompt's whole blocks and every decoded block stored
  by a call of their own, as the reference does; ``stop_at_eos=false``) on the canvas the reference builds,
  the prompt and masks up to whole blocks. Both return every position after the prompt. Batch 1 only (the
  function builds a canvas of one row). SDAR's sampler has no temperature-0 path (it divides by the
  temperature) and always draws with ``torch.multinomial`` from the global generator, so this case is
  *sampled*; but its draws are made identical: the reference is seeded (``torch.manual_seed(0)``) before every
  call, and unmask's warm-up call draws the same Exp(1) numbers (:class:`TorchMultinomialDraws`, the
  ``exponential_`` draws ``torch.multinomial`` makes on the CPU, read through the sampler's ``streams``), so
  the *tokens* of the warm-ups are compared. The timed calls use unmask's own random streams: they are
  checked by the NFE of the warm-up and by every position being revealed (the output head is drawn small,
  :data:`HEAD_GAIN`, so that no draw reaches the threshold and the number of calls is the schedule's:
  ``--block`` + 1 per block, the part of a block after the prompt for the prompt's last block);
* ``llada2`` (ZHZisZZ/dllm ``dllm/pipelines/llada21/models/modeling_llada21_moe.py``: LLaDA2.1's
  ``LLaDA2MoeModelLM.generate``) at temperature 0 with its default threshold 0.95, editing threshold 0.9 and
  ``max_post_steps`` 16, ``eos_early_stop=false``: threshold commits of masked positions and token-to-token
  edits of decoded ones, every call on the window of all blocks so far without a cache; against unmask's
  ``llada2`` sampler with the same keys and ``kv_cache=false`` (the same window calls) on the canvas of
  whole blocks. Deterministic: the tokens are compared (what the reference returns, the generated part cut
  after its first EOS; unmask's is cut the same way). Batch 1 only (the function builds a canvas of one row
  and reads row 0). The model's SDPA attention gets the bfloat16 block mask that ``generate`` builds cast to
  float32, the one change the reference vectors made (their README, section 2).

The references' model classes run as the reference vectors ran them (``../shared/reference/vectors2026``,
README section 2): SDAR's ``modeling_sdar.py`` with stand-ins for its flash-attn imports (``rms_norm_fn``
computed as documented in float32, ``flash_attn_func`` as attention without a mask with grouped-query
heads; :func:`reference_worker.install_sdar_stand_ins`) and ``attn_implementation="sdpa"``; dllm's LLaDA2.1
file loaded from its folder alone (not through dllm's package). Their random weights are
:func:`block_folder`'s; the LLaDA2 model's make it commit one or several positions per call and edit decoded
ones (at the default shape: 166 calls for 144 positions, 10 calls committing several, 194 edits).

Each round runs every case once per side, each side in a fresh process (the reference under its own
Python: ``--reference-python`` for Fast-dLLM, which pins transformers 4.49, and bd3lms; ``--sdar-python`` for
SDAR, whose model file needs transformers 4.52.4 (its config.json's version; 4.57 has no ``LossKwargs``);
``--dllm-python`` for dllm, which pins 4.57), in alternating order; a process times ``--repeats`` calls after
a warm-up by its CPU time at one thread. The tokens (and NFE) of the two sides are compared first: a case
whose tokens differ gets no ratio. Reported: median tokens/s per side and the ratio unmask / reference with
its spread over rounds. Only the cases whose checkouts are given run (``--cases`` picks among them).

    python benchmarks/reference_peers.py --fast-dllm ~/src/Fast-dLLM --llada ~/src/LLaDA --bd3lms ~/src/bd3lms \\
        --reference-python ~/venvs/fast-dllm/bin/python --rounds 5
    python benchmarks/reference_peers.py --sdar ~/src/SDAR --sdar-python ~/venvs/sdar/bin/python \\
        --dllm ~/src/dllm --dllm-python ~/venvs/dllm/bin/python --rounds 5
    python benchmarks/reference_peers.py --smoke     # seconds, against a stand-in reference (the test suite)

``--smoke`` without checkouts runs the whole harness against a stand-in: a "reference" whose functions
decode with unmask's own samplers (equal tokens by construction), so that the harness is tested, not the
references; with checkouts, the smoke cases they allow against the references themselves. Appends a record
to ``benchmarks/results/reference_peers.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from unmask.checkpoints.open_weights import save_released
from unmask.checkpoints.pretrained import Pretrained
from unmask.config import SampleConfig, load_config
from unmask.families import build_model
from unmask.pipeline import from_pretrained
from unmask.samplers.base import RowStreams, row_seeds
from unmask.samplers.registry import make_sampler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from llada_samplers import dit_folder, released_folder, word_tokenizer  # noqa: E402
from reference_worker import timed  # noqa: E402

from common import append_record, run_header  # noqa: E402

# case -> (model layout, the reference's function, its keywords, unmask's sample settings, batch sizes)
CASES: dict[str, tuple[str, str, dict, dict, str]] = {}
SAMPLED = ("bd3lm", "mdlm")  # the layouts of the sampled cases (a BOS-only prompt; no equal tokens to check)
BLOCK_LAYOUTS = ("sdar", "llada2")  # the 2026 block-diffusion releases: canvases of whole blocks
# the checkouts (flags) each reference reads, by the repository named in a case's function
NEEDS = {"llada": ("fast_dllm", "llada"), "fast-dllm": ("fast_dllm",), "dream": ("fast_dllm",),
         "dream-block": ("fast_dllm",), "bd3lms": ("bd3lms",), "sdar": ("sdar",), "dllm": ("dllm",)}
CHECKOUTS = ("fast_dllm", "llada", "bd3lms", "sdar", "dllm")
SDAR_THRESHOLD, SDAR_TEMPERATURE = 0.85, 1.0  # generate.py's defaults (confidence_threshold, temperature)
# LLaDA2.1's generate's defaults: threshold, editing_threshold, max_post_steps
LLADA2_THRESHOLD, LLADA2_EDIT, LLADA2_POST = 0.95, 0.9, 16


def add_cases(gen: int, block: int) -> None:
    steps = dict(steps=gen)
    CASES["llada"] = ("llada", "llada:generate", dict(**steps, gen_length=gen, block_length=block, temperature=0.0,
                                                     cfg_scale=0.0, remasking="low_confidence"),
                      dict(sampler="llada", **steps, block_length=block, temperature=0.0), "both")
    for name, function, cache in (("fast-dllm", "generate", "none"), ("fast-dllm-prefix", "generate_with_prefix_cache",
                                                                    "prefix"),
                                  ("fast-dllm-dual", "generate_with_dual_cache", "dual")):
        for threshold in (None, 0.9):
            CASES[name + ("" if threshold is None else "-thr0.9")] = (
                "llada", f"fast-dllm:{function}", dict(**steps, gen_length=gen, block_length=block, temperature=0.0,
                                                       remasking="low_confidence", threshold=threshold),
                dict(sampler="llada", **steps, block_length=block, temperature=0.0, threshold=threshold or 0.0,
                     block_cache=cache), "one")
    CASES["dream"] = ("dream", "dream:diffusion_generate", dict(**steps, max_new_tokens=gen, alg="entropy",
                                                               alg_temp=None, eps=1e-3, temperature=0.0),
                      dict(sampler="dream", **steps, score="entropy", temperature=0.0), "both")
    for cache in ("prefix", "dual"):
        CASES[f"dream-block-{cache}"] = (
            "dream", "dream-block:diffusion_generate",
            dict(**steps, max_new_tokens=gen, alg="confidence_threshold", alg_temp=None, eps=1e-3, temperature=0.0,
                 threshold=0.9, block_length=block, dual_cache=cache == "dual"),
            dict(sampler="dream", **steps, score="confidence", temperature=0.0, threshold=0.9, block_length=block,
                 block_cache=cache), "one")
    CASES["bd3lm"] = ("bd3lm", "bd3lms:_semi_ar_sampler", dict(algo="bd3lm"),
                      dict(sampler="first_hitting", kv_cache=False), "one")
    CASES["mdlm"] = ("mdlm", "bd3lms:_semi_ar_sampler", dict(algo="mdlm"), dict(sampler="first_hitting"), "one")
    CASES["sdar"] = ("sdar", "sdar:block_diffusion_generate",
                     dict(gen_length=gen, block_length=block, denoising_steps=block, temperature=SDAR_TEMPERATURE,
                          top_k=0, top_p=1.0, remasking_strategy="low_confidence_dynamic",
                          confidence_threshold=SDAR_THRESHOLD, stopping_criteria_idx=None),
                     dict(sampler="sdar", steps=block, strategy="dynamic", threshold=SDAR_THRESHOLD,
                          temperature=SDAR_TEMPERATURE, block_size=block, commit_calls="separate", stop_at_eos=False),
                     "one")
    CASES["llada2"] = ("llada2", "dllm:generate",
                       dict(gen_length=gen, block_length=block, steps=block, temperature=0.0, top_p=None, top_k=None,
                            eos_early_stop=False, minimal_topk=1, threshold=LLADA2_THRESHOLD,
                            editing_threshold=LLADA2_EDIT, max_post_steps=LLADA2_POST, num_to_transfer=1),
                       dict(sampler="llada2", threshold=LLADA2_THRESHOLD, edit_threshold=LLADA2_EDIT,
                            max_post_steps=LLADA2_POST, temperature=0.0, block_size=block, kv_cache=False,
                            stop_at_eos=False), "one")


def needs(case: str) -> tuple[str, ...]:
    """The checkouts (flag names) the reference side of ``case`` reads."""
    return NEEDS[CASES[case][1].split(":")[0]]


def whole_blocks(length: int, block: int) -> int:
    """``length`` rounded up to whole blocks: the canvas SDAR's and LLaDA2's ``generate`` build."""
    return -(-length // block) * block


# The random weights of the block-diffusion models, after the reference vectors' recipe (their README, section
# 3): norm weights 1 + 0.2 z, embeddings z, matrices gain / sqrt(fan-in) z with gain 2 (the output head:
# HEAD_GAIN), LLaDA2's router bias 0.3 z; the mask's output row zero. The output heads are set apart: LLaDA2.1's
# rule at temperature 0 then commits one or several positions per call and edits decoded ones (at the default
# shape the best candidate's probability has median 0.44 and exceeds 0.85 at 8% of the positions), while SDAR's
# draws at temperature 1 stay far below its 0.85 threshold (the best candidate's probability is below 0.4% at the
# default shape, and about 0.1 with a largest of 0.5 at --smoke's vocabulary of 64), so that its number of calls
# is set by its schedule and not by the draws (see the sdar case in the module docstring).
HEAD_GAIN = {"sdar": 1.0, "llada2": 6.0}


def block_folder(folder: Path, layout: str, args) -> Path:
    """A random model in SDAR's (Qwen3 with blocks: query/key norms, grouped-query attention) or LLaDA2's
    (Ling 2.0's MoE) released layout, written by unmask (``save_released``) with
    :func:`llada_samplers.word_tokenizer`: ``--hidden`` wide, ``--blocks`` layers, ``--heads`` heads of
    hidden / heads with a quarter as many key/value heads, MLP ``--mlp``; LLaDA2: 16 routed experts of
    hidden / 2 (top 4, 4 groups, top 2 groups, scale 2.5), one shared expert, the first layer dense (when
    there are two or more), half of each head rotated. Weights: :data:`HEAD_GAIN`."""
    tokenizer = word_tokenizer(args.vocab)
    length = max(args.prompt + args.gen + 8, whole_blocks(args.prompt + args.gen, args.block))
    keys = ["family=bd3lm", "model.backbone=llama", f"model.hidden={args.hidden}", f"model.blocks={args.blocks}",
            f"model.heads={args.heads}", f"model.kv_heads={max(1, args.heads // 4)}",
            f"model.head_dim={args.hidden // args.heads}", "model.qk_norm=true", f"model.intermediate={args.mlp}",
            "model.norm_eps=1e-6", f"model.length={length}", f"model.block_size={args.block}", "model.dropout=0",
            "data.tokenizer=hf", f"data.length={length}"]
    if layout == "sdar":
        keys += ["model.rope_base=1000000"]
    else:
        keys += ["model.rope_base=600000", f"model.rotary_dim={args.hidden // args.heads // 2}",
                 "model.moe_experts=16", "model.moe_top_k=4", f"model.moe_width={args.hidden // 2}",
                 "model.moe_shared=1", "model.moe_groups=4", "model.moe_top_groups=2", "model.moe_scale=2.5",
                 f"model.moe_dense_layers={min(1, args.blocks - 1)}"]
    cfg = load_config(None, keys)
    model = build_model(cfg, tokenizer)
    draws = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            z = torch.randn(p.shape, generator=draws)
            gain = HEAD_GAIN[layout] if name == "lm_head.weight" else 2.0
            p.copy_(1 + 0.2 * z if p.dim() == 1 else z if "embed" in name else gain / p.shape[-1] ** 0.5 * z)
        for name, b in sorted(model.named_buffers()):
            if name.endswith("expert_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=draws))
        model.lm_head.weight[tokenizer.mask_id] = 0
    return save_released(Pretrained(folder, cfg, tokenizer, 0, model.state_dict()), folder, layout)


class TorchMultinomialDraws(RowStreams):
    """The Exp(1) draws that ``torch.multinomial`` makes in SDAR's ``generate`` after ``torch.manual_seed``:
    one (1, block, V) slab per denoising call from ``generator`` (shared by the blocks of a decoding), as it
    draws one for every position of the block (a multinomial over (block, V) probabilities computes
    ``argmax(p / q)``, ``q = exponential_(1)``); unmask's sampler reads the slab's masked positions as
    uniforms ``exp(-q)`` (its ``-log u`` is then ``q``), as tests/test_vectors2026.py replays the recorded
    draws. The reference's own draws, so that the sampled tokens can be compared."""

    def __init__(self, seeds: torch.Tensor, generator: torch.Generator, block: int):
        super().__init__(seeds)
        self.generator, self.block = generator, block

    def uniforms(self, rows, counter, index, n):
        slab = torch.empty(1, self.block, n).exponential_(generator=self.generator)
        return torch.exp(-slab[rows, index].double())


def write_models(root: Path, args, layouts: set[str]) -> dict[str, Path]:
    """The random models of ``layouts``, written by unmask: LLaDA's and Dream's released layouts (float32), the
    DiTs of BD3-LM (blocks of ``--block``) and MDLM of ``--gen`` positions, SDAR's and LLaDA2's released
    layouts (:func:`block_folder`)."""
    folders = {}
    for layout in sorted(layouts):
        if layout in SAMPLED:
            folders[layout] = dit_folder(root / layout, args.hidden, args.blocks, args.heads, args.vocab, args.gen,
                                         args.block if layout == "bd3lm" else 0)
        elif layout in BLOCK_LAYOUTS:
            folders[layout] = block_folder(root / layout, layout, args)
        else:
            folders[layout] = released_folder(root / layout, args.hidden, args.blocks, args.heads, args.mlp,
                                              args.vocab, args.prompt + args.gen + 8, layout)
    return folders


def prompt_ids(case: str, batch: int, args) -> torch.Tensor:
    """The prompt rows of ``case``: ``--prompt`` random tokens, or BOS alone (id vocab - 2 of the word tokenizer)
    for the sampled cases, whose reference starts every row with BOS."""
    if CASES[case][0] in SAMPLED:
        return torch.full((batch, 1), args.vocab - 2)
    return torch.randint(0, args.vocab - 3, (batch, args.prompt), generator=torch.Generator().manual_seed(7))


def generated(case: str, args) -> int:
    return args.gen - 1 if CASES[case][0] in SAMPLED else args.gen


def unmask_call(case: str, folder: Path, prompt: torch.Tensor, gen: int):
    """A function decoding ``prompt`` with unmask's sampler for ``case`` -> (generated tokens, nfe). SDAR's and
    LLaDA2's cases decode a canvas of whole blocks, as their references build it, and return what the
    reference returns: SDAR's whole canvas after the prompt, LLaDA2's ``gen`` positions cut after their first
    EOS. SDAR's first call (the warm-up) draws the reference's own random numbers
    (:class:`TorchMultinomialDraws`), the later (timed) ones unmask's own streams."""
    lm = from_pretrained(folder)
    layout, settings = CASES[case][0], CASES[case][3]
    p = prompt.shape[1]
    length = whole_blocks(p + gen, settings["block_size"]) if layout in BLOCK_LAYOUTS else p + gen
    sampler = make_sampler(SampleConfig(**settings), lm.objective, lm.tokenizer, length)
    canvas = torch.cat([prompt, torch.full((prompt.shape[0], length - p), lm.tokenizer.mask_id)], dim=1)
    calls = [0]

    def call():
        if layout == "sdar":
            draws = torch.Generator().manual_seed(0)
            sampler.inner.streams = ((lambda seeds: TorchMultinomialDraws(seeds, draws, settings["block_size"]))
                                     if calls[0] == 0 else RowStreams)
        calls[0] += 1
        out = sampler.sample(lm.model, canvas, row_seeds(0, len(canvas)))
        tokens = out.tokens[:, p:]
        if layout == "llada2":  # LLaDA2.1's generate returns the generated part up to its first EOS
            eos = (tokens[0, :gen] == lm.tokenizer.eos_id).nonzero()
            tokens = tokens[:, :int(eos[0]) + 1 if len(eos) else gen]
        return tokens, out.nfe
    return call


def run_side(args, side: str, case: str, batch: int, folder: Path) -> dict:
    """One process of ``side`` decoding ``case`` at ``batch`` rows: the reference's worker under its Python
    (``reference_worker.py``; with ``--stand-in``, unmask's worker plays it), or unmask's."""
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1")
    prompt = prompt_ids(case, batch, args)
    if side == "reference" and not args.stand_in:
        layout, function, kwargs = CASES[case][:3]
        python = {"sdar": args.sdar_python, "dllm": args.dllm_python}.get(function.split(":")[0])
        checkouts = [arg for name in CHECKOUTS if getattr(args, name)
                     for arg in ("--" + name.replace("_", "-"), getattr(args, name))]
        cmd = [python or args.reference_python or sys.executable, str(ROOT / "benchmarks" / "reference_worker.py"),
               *checkouts, "--folder", str(folder), "--repeats", str(args.repeats),
               "--case", json.dumps(dict(layout=layout, function=function, kwargs=kwargs)),
               "--prompt", json.dumps(prompt.tolist())]
    else:
        flags = [f"--{k}={getattr(args, k)}" for k in ("prompt", "gen", "block", "vocab", "repeats")]
        cmd = [sys.executable, __file__, "--worker", case, "--worker-batch", str(batch), "--folder", str(folder),
               *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{side} {case} (batch {batch}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast-dllm", help="a checkout of NVlabs/Fast-dLLM (its llada/ and dream/ folders)")
    parser.add_argument("--llada", help="a checkout of ML-GSAI/LLaDA (its generate.py)")
    parser.add_argument("--bd3lms", help="a checkout of kuleshov-group/bd3lms (the bd3lm and mdlm cases; its "
                        "environment needs lightning, hydra-core and omegaconf)")
    parser.add_argument("--sdar", help="a checkout of JetAstra/SDAR (the sdar case: its generate.py and "
                        "training/model/SDAR-4B-Chat/; its environment needs transformers 4.52.4 and einops)")
    parser.add_argument("--dllm", help="a checkout of ZHZisZZ/dllm (the llada2 case: its "
                        "dllm/pipelines/llada21/models/; its environment needs transformers 4.57)")
    parser.add_argument("--reference-python", help="the Python of the references' environment (transformers 4.49); "
                        "default: this one")
    parser.add_argument("--sdar-python", help="the Python of SDAR's environment (transformers 4.52.4); default: "
                        "--reference-python")
    parser.add_argument("--dllm-python", help="the Python of dllm's environment (transformers 4.57); default: "
                        "--reference-python")
    parser.add_argument("--cases", help="comma-separated cases (default: every case the checkouts given allow)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--mlp", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="the larger batch size (the smaller is 1)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per process after its warm-up")
    parser.add_argument("--smoke", action="store_true", help="seconds at a tiny shape against the stand-in")
    parser.add_argument("--stand-in", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    given = {name for name in CHECKOUTS if getattr(args, name)}
    add_cases(args.gen, args.block)
    if args.smoke:
        args.hidden, args.blocks, args.heads, args.mlp, args.vocab = 32, 1, 4, 64, 64
        args.prompt, args.gen, args.block, args.batch, args.rounds, args.repeats = 4, 8, 4, 2, 1, 1
        add_cases(args.gen, args.block)
        args.stand_in = not given
        smoke = ("llada", "dream-block-dual", "bd3lm", "sdar", "llada2")
        args.cases = args.cases or ",".join(c for c in smoke if not given or set(needs(c)) <= given)
    if args.worker:  # unmask's side of one case
        torch.set_num_threads(1)
        prompt = prompt_ids(args.worker, args.worker_batch, args)
        call = unmask_call(args.worker, Path(args.folder), prompt, generated(args.worker, args))
        print(json.dumps(timed(call, args.repeats)))
        return
    if not args.stand_in and not given:
        parser.error("give local checkouts of the references (--fast-dllm, --llada, --bd3lms, --sdar, --dllm), "
                     "or --smoke")
    cases = args.cases.split(",") if args.cases else [c for c in CASES if set(needs(c)) <= given]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {', '.join(CASES)}")
    missing = {c: [f"--{n.replace('_', '-')}" for n in needs(c) if n not in given] for c in cases}
    if not args.stand_in and any(missing.values()):
        parser.error("; ".join(f"case {c} needs {' and '.join(m)}" for c, m in missing.items() if m))
    record = {**run_header(args.tag, ceilings=not args.smoke), "args": vars(args), "cases": {},
              "reference_commits": {name: commit_of(getattr(args, name)) for name in CHECKOUTS}}
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_models(Path(tmp), args, {CASES[case][0] for case in cases})
        runs = [(case, batch) for case in cases for batch in ((1, args.batch) if CASES[case][4] == "both" else (1,))]
        results: dict[tuple[str, int], dict[str, list[dict]]] = {run: {"reference": [], "unmask": []} for run in runs}
        for r in range(args.rounds):
            for case, batch in runs:
                folder = folders[CASES[case][0]]
                for side in (("reference", "unmask") if r % 2 == 0 else ("unmask", "reference")):
                    results[(case, batch)][side].append(run_side(args, side, case, batch, folder))
    print("| case | batch | same work | NFE ref / unmask | ref tok/s | unmask tok/s | unmask / ref | spread |")
    print("|---|---|---|---|---|---|---|---|")
    for (case, batch), sides in results.items():
        ref, ours = sides["reference"], sides["unmask"]
        same, label = agreement(case, ref + ours, args.vocab - 1)
        ratios = sorted(r["seconds"] / u["seconds"] for r, u in zip(ref, ours))
        row = {"batch": batch, "agreement": label, "nfe_reference": ref[0]["nfe"], "nfe_unmask": ours[0]["nfe"],
               "reference_tokens_per_second": ref[0]["generated"] / statistics.median(x["seconds"] for x in ref),
               "unmask_tokens_per_second": ours[0]["generated"] / statistics.median(x["seconds"] for x in ours),
               "ratio": statistics.median(ratios) if same else None, "ratio_spread": [ratios[0], ratios[-1]]}
        record["cases"][f"{case} B{batch}"] = row
        print(f"| {case} | {batch} | {label} | {row['nfe_reference']} / {row['nfe_unmask']} | "
              f"{row['reference_tokens_per_second']:.1f} | {row['unmask_tokens_per_second']:.1f} | "
              f"{'-' if row['ratio'] is None else format(row['ratio'], '.2f') + 'x'} | "
              f"{ratios[0]:.2f} - {ratios[-1]:.2f} |")
    if not args.smoke:
        append_record("reference_peers", record)


def agreement(case: str, runs: list[dict], mask_id: int) -> tuple[bool, str]:
    """Whether every run of ``case`` (both sides) did the same work: equal tokens, or for a sampled case equal
    NFE and generated counts with no position left masked (``sampled``); for SDAR's, equal tokens of the
    warm-up calls (unmask's drew the reference's random numbers) and, for the timed calls (unmask's own draws),
    the warm-up's NFE with no position left masked; with its label for the table."""
    if CASES[case][0] == "sdar":
        tokens = all(r["tokens"] == runs[0]["tokens"] for r in runs)
        work = all(r["last_nfe"] == runs[0]["nfe"] and mask_id not in sum(r["last_tokens"], []) for r in runs)
        return tokens and work, ("sampled, tokens equal" if tokens and work else
                                 "sampled, tokens DIFFER" if not tokens else "sampled, NFE DIFFER")
    if CASES[case][0] not in SAMPLED:
        same = all(r["tokens"] == runs[0]["tokens"] for r in runs)
        return same, "tokens equal" if same else "tokens DIFFER"
    same = all((r["nfe"], r["generated"]) == (runs[0]["nfe"], runs[0]["generated"]) and
               mask_id not in sum(r["tokens"], []) for r in runs)
    return same, "sampled, NFE equal" if same else "sampled, NFE DIFFER"


def commit_of(checkout: str | None) -> str | None:
    """The checkout's commit (a git work tree), or None when it is not one."""
    if not checkout:
        return None
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True)
    return proc.stdout.strip() or None


if __name__ == "__main__":
    main()
