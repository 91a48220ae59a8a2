"""The vision-language policy: Qwen3-VL whose tokenizer is extended with K PhysCode tokens (paper
Sec. 10.2 Stage 3), so latent actions are emitted by ordinary decoding.

  prompt:  [IMG(x_t)] "Goal: g"   ->   <PC_c1> ... <PC_cL>

A checkpoint is a plain Qwen3-VL directory (config.json, safetensors, tokenizer with its chat
template, preprocessor_config.json) plus `physcode_tokens.json`, the map code index <-> token id.
Loading a base checkpoint without that file adds the K tokens (embeddings grown when the new ids
pass their end, never shrunk; the PhysCode rows drawn around the trained rows' mean). Images are preprocessed by transformers' `Qwen2VLImageProcessorPil`, so no
torchvision is needed; the image placeholder is expanded here the way Qwen3-VL's processor does.

Sampling and learning use one distribution (`sampling_logprobs`): the K PhysCode logits at the
sampling temperature T, restricted to the top-p nucleus and renormalised. `propose` draws from exactly
that distribution (a logits processor computes it; generate's own temperature, top-k and top-p are
off, whatever the checkpoint's generation_config says) and returns its log-probabilities, which the
learner recomputes teacher-forced from `code_logits` for GRPO's ratio. The KL to pi_0 is taken between
the whole K-code distributions at T (algos/grpo.py), so codes outside the nucleus are regularised too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ipr_dist.errors import ConfigError

PHYSCODE_TOKENS = "physcode_tokens.json"
FRAME_ADAPTER = "frame_adapter.json"
FRAME_ADAPTER_WEIGHTS = "frame_adapter.safetensors"
ADAPTER_KEY = "model.visual.frame_adapter."  # its parameters' prefix in the model's state_dict
IMAGE_PAD = "<|image_pad|>"
PROCESSOR_FILES = ("video_preprocessor_config.json", "processor_config.json", "chat_template.json",
                   "chat_template.jinja")


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
                      include: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probabilities (..., K) of the distribution codes are drawn from, given the K PhysCode logits:
    softmax(logits / T) restricted to the nucleus (the most likely codes whose mass before each is under
    top_p; at least one) and renormalised, -inf outside it. Nucleus membership carries no gradient.
    `include` (...,) code indices always counted in the nucleus: a learner recomputing the log-probability
    of a drawn code passes it, so a code at the nucleus' edge (the server's arithmetic, bf16, or an older
    policy version put it inside) gets a finite value instead of -inf. T <= 0 (greedy decoding) gives the
    T = 1 distribution without a nucleus."""
    logp = torch.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), -1)
    if temperature <= 0 or top_p >= 1.0:
        return logp
    with torch.no_grad():
        sorted_p, order = logp.exp().sort(-1, descending=True)
        keep = torch.zeros_like(logp, dtype=torch.bool).scatter(-1, order, (sorted_p.cumsum(-1) - sorted_p) < top_p)
        if include is not None:
            keep.scatter_(-1, include[..., None], True)
    kept = logp.masked_fill(~keep, float("-inf"))
    return kept - torch.logsumexp(kept, -1, keepdim=True)


def first_code_kl(policy: PhysCodePolicy, reference: PhysCodePolicy, frames: list[np.ndarray], goals: list[str],
                  temperature: float, batch: int = 16) -> np.ndarray:
    """KL(policy || reference) of the first code's distribution at the sampling temperature, per frame (N,):
    how far training moved the policy on these states (no gradient)."""
    t = temperature if temperature > 0 else 1.0
    out = []
    with torch.no_grad():
        for i in range(0, len(frames), batch):
            inputs = policy.inputs(frames[i:i + batch], goals[i:i + batch])
            first = torch.zeros((len(frames[i:i + batch]), 1), dtype=torch.long, device=policy.device)
            lp = torch.log_softmax(policy.code_logits(inputs, first)[:, 0] / t, -1)
            lr = torch.log_softmax(reference.code_logits(inputs, first)[:, 0] / t, -1)
            out.append((lp.exp() * (lp - lr)).sum(-1).cpu().numpy())
    return np.concatenate(out)


def physcode_token(k: int) -> str:
    return f"<PC_{k}>"


def prompt_text(goal: str) -> str:
    return f"Goal: {goal}"


def chat_prompt(tokenizer, goal: str) -> str:
    """`[IMG(x_t)] "Goal: g"` in the checkpoint's chat template, one image placeholder (a backend
    expands it to the image's token count), ending where the assistant's PhysCode tokens begin."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt_text(goal)}]}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def image_prompts(tokenizer, image_processor, frames: list[np.ndarray], texts: list[str],
                  device: str = "cpu") -> dict[str, torch.Tensor]:
    """Tokenised chat prompts, each with one image placeholder expanded to its frame's token count
    (done here because Qwen3VLProcessor needs torchvision), with the frames' pixel values."""
    from PIL import Image

    images = [Image.fromarray(np.asarray(f, np.uint8)) for f in frames]
    pixels = image_processor(images, return_tensors="pt")
    merge = image_processor.merge_size ** 2
    texts = [t.replace(IMAGE_PAD, IMAGE_PAD * (int(grid.prod()) // merge), 1)
             for t, grid in zip(texts, pixels["image_grid_thw"])]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    batch = {**enc, **pixels, "mm_token_type_ids": (enc["input_ids"] == image_token).int()}
    return {k: v.to(device) for k, v in batch.items()}


class FrameAdapter(torch.nn.Module):
    """A second visual path beside Qwen3-VL's vision tower, for the embedded tiny model.

    Its randomly initialised vision tower collapses to a nearly constant output (docs/policy.md), so the
    tiny policy learnt each game's codes from the goal and nothing from the frame. The adapter is the
    Stage 1 appearance encoder's conv net (initialised from the run's trained one), its patch grid
    average-pooled to the merged image-token grid, normalised and projected to the language model's
    width, and added to the merged image tokens (a forward hook on the vision merger). The projection
    starts at zero, so a fresh adapter leaves the model's outputs unchanged. It is part of the model:
    trained by alignment and GRPO, sharded, synced to the servers; a checkpoint keeps it in
    `frame_adapter.safetensors` beside the Qwen3-VL weights (which stay a plain Qwen3-VL directory)."""

    def __init__(self, dim: int, hidden: int, frame_size: tuple[int, int], merge: int, cells: int = 1,
                 mlp: bool = False):
        super().__init__()
        from ipr_dist.models.encoders import SmallImageEncoder

        self.dim, self.hidden, self.frame_size, self.merge = dim, hidden, tuple(frame_size), merge
        self.cells, self.mlp = cells, mlp
        self.net = SmallImageEncoder(dim, self.frame_size).net
        width = dim * cells * cells  # each image token carries its cells x cells sub-grid, side by side
        self.norm = torch.nn.LayerNorm(width)
        if mlp:  # a two-layer projector (LLaVA's), its output layer starting at zero
            self.proj = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
        else:
            self.proj = torch.nn.Linear(width, hidden)
        last = self.proj[-1] if mlp else self.proj
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
        self.frames: torch.Tensor | None = None  # the images of the forward pass under way

    def meta(self) -> dict:
        return {"dim": self.dim, "hidden": self.hidden, "frame_size": list(self.frame_size), "merge": self.merge,
                "cells": self.cells, "mlp": self.mlp}

    def forward(self, frames: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """frames (N, H, W, 3) uint8, grid (N, 3) image_grid_thw -> (merged tokens of all N, hidden).

        The conv map is average-pooled to (cells x the merged grid) and each token gets its cells x cells
        block, concatenated as Qwen's own merger concatenates 2 x 2 patches: with cells 2 a 64 x 64 frame's
        4 image tokens carry a 4 x 4 map rather than a 2 x 2 one, at no cost in sequence length."""
        param = next(self.proj.parameters())
        x = frames.to(param.device).permute(0, 3, 1, 2).to(param.dtype) / 255.0
        maps = self.net(x)
        c = self.cells
        tokens = []
        for m, (t, h, w) in zip(maps, grid.tolist()):
            gh, gw = h // self.merge, w // self.merge
            pooled = torch.nn.functional.adaptive_avg_pool2d(m[None], (gh * c, gw * c))[0]  # (dim, gh c, gw c)
            blocks = pooled.view(self.dim, gh, c, gw, c).permute(1, 3, 0, 2, 4).reshape(gh * gw, -1)
            tokens.append(blocks.repeat(t, 1))  # raster order of the merged grid, per frame
        return self.proj(self.norm(torch.cat(tokens)))

    def hook(self, module, args, kwargs, output):
        """After the vision tower: its merged tokens plus the adapter's, for the images it was given
        (generate repeats each prompt's image for its sampled sequences; so are the frames)."""
        if self.frames is None:
            raise RuntimeError("the frame adapter was given no frames: build inputs with PhysCodePolicy.inputs")
        grid = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        frames = self.frames.repeat_interleave(len(grid) // len(self.frames), 0)
        output.pooler_output = output.pooler_output + self(frames, grid).to(output.pooler_output.dtype)
        return output

    def attach(self, model) -> None:
        model.model.visual.frame_adapter = self
        model.model.visual.register_forward_hook(self.hook, with_kwargs=True)

    @staticmethod
    def add_to_checkpoint(path: Path, dim: int, frame_size: tuple[int, int], encoder_state: dict | None = None,
                          cells: int = 1, mlp: bool = False) -> None:
        """Give the checkpoint at `path` a fresh adapter, its conv net copied from `encoder_state` (a
        SmallImageEncoder's state_dict of the same dim and frame size) when given."""
        from safetensors.torch import save_file

        config = json.loads((path / "config.json").read_text())
        hidden = config["text_config"]["hidden_size"]
        merge = config["vision_config"]["spatial_merge_size"]
        adapter = FrameAdapter(dim, hidden, frame_size, merge, cells, mlp)
        if encoder_state is not None:
            adapter.net.load_state_dict({k[len("net."):]: v for k, v in encoder_state.items() if k.startswith("net.")})
        save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(path / FRAME_ADAPTER_WEIGHTS))
        (path / FRAME_ADAPTER).write_text(json.dumps(adapter.meta()))

    @staticmethod
    def load(path: Path) -> FrameAdapter:
        from safetensors.torch import load_file

        meta = json.loads((path / FRAME_ADAPTER).read_text())
        adapter = FrameAdapter(meta["dim"], meta["hidden"], tuple(meta["frame_size"]), meta["merge"],
                               meta.get("cells", 1), meta.get("mlp", False))  # checkpoints before both: 1, linear
        adapter.load_state_dict(load_file(str(path / FRAME_ADAPTER_WEIGHTS)))
        return adapter


@dataclass
class Proposals:
    codes: np.ndarray  # (N, B, L) code indices
    logprobs: np.ndarray  # (N, B) log pi(sequence | frame, goal) of each whole sequence
    version: int  # weight version that produced them


class PhysCodePolicy:
    """Qwen3-VL with PhysCode tokens: prompts, constrained proposals, teacher-forced log-probs."""

    def __init__(self, path: str | Path, codes: int | None = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path}: not a Qwen3-VL checkpoint (no config.json); set policy.model_path to a local "
                              "checkpoint directory, or build the embedded one with `ipr policy init-tiny PATH`")
        self.path = path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"  # prompts end together, so generated tokens line up
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
        self.model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=dtype)
        self.adapter = FrameAdapter.load(path).to(dtype) if (path / FRAME_ADAPTER).is_file() else None
        if self.adapter is not None:
            self.adapter.attach(self.model)
        self.model.to(device)
        # The processor files neither the tokenizer nor the image processor writes (the video processor's
        # config, a separate chat template): kept so every saved checkpoint is a whole Qwen3-VL directory
        # that vLLM can build its processor from.
        self.extra_files = {name: (path / name).read_bytes() for name in PROCESSOR_FILES if (path / name).is_file()}
        self.device = device
        self.version = 0
        mapping = path / PHYSCODE_TOKENS
        if mapping.is_file():
            meta = json.loads(mapping.read_text())
            if codes is not None and codes != meta["codes"]:
                raise ConfigError(f"{path}: its PhysCode tokens are for K={meta['codes']} codes but the run's "
                                  f"codebook has {codes}; align the policy again for this codebook")
            self.token_ids = torch.tensor(meta["token_ids"])
            self.version = int(meta.get("version", 0))  # a GRPO checkpoint keeps the version it was saved at
        else:
            if codes is None:
                raise ConfigError(f"{path}: has no PhysCode tokens yet; give the codebook size to add them")
            self._add_tokens(codes)
        self.codes = len(self.token_ids)
        self._code_of = {int(t): k for k, t in enumerate(self.token_ids)}

    def _add_tokens(self, codes: int) -> None:
        """Add the K PhysCode tokens. Released checkpoints pad their embedding past the tokenizer
        (Qwen3-VL-8B: 151,936 rows for 151,669 tokens), so the new ids may land on untrained padding
        rows: the matrix only ever grows (never resized down to the tokenizer), and the PhysCode rows,
        wherever they land, are set to the trained rows' mean plus a little per-dimension noise, in the
        input embedding and in an untied output head, so the tokens start distinct but in-distribution."""
        names = [physcode_token(k) for k in range(codes)]
        trained = len(self.tokenizer)  # rows of real tokens; everything past them is padding or new
        self.tokenizer.add_tokens(names, special_tokens=True)
        self.token_ids = torch.tensor(self.tokenizer.convert_tokens_to_ids(names))
        rows = self.model.get_input_embeddings().weight.shape[0]
        if len(self.tokenizer) > rows:
            self.model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        generator = torch.Generator().manual_seed(0)
        tables = [self.model.get_input_embeddings().weight]
        head = self.model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != tables[0].data_ptr():
            tables.append(head.weight)
        with torch.no_grad():
            for table in tables:
                real = table[:trained].float()
                mean, std = real.mean(0), real.std(0)
                noise = torch.randn(len(self.token_ids), table.shape[1], generator=generator)
                table[self.token_ids] = (mean + 1e-2 * std * noise).to(table.dtype)

    def save(self, out: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The checkpoint's files into the local directory `out` (a run commits it as a version:
        RunLayout.new_checkpoint); `state_dict`: weights gathered from shards (FSDP learners),
        instead of the model's own."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else self.model.state_dict()
        adapter = {k[len(ADAPTER_KEY):]: v for k, v in state.items() if k.startswith(ADAPTER_KEY)}
        self.model.save_pretrained(out, state_dict={k: v for k, v in state.items() if not k.startswith(ADAPTER_KEY)})
        if self.adapter is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in adapter.items()}, str(out / FRAME_ADAPTER_WEIGHTS))
            (out / FRAME_ADAPTER).write_text(json.dumps(self.adapter.meta()))
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)
        for name, data in self.extra_files.items():
            if not (out / name).is_file():
                (out / name).write_bytes(data)
        (out / PHYSCODE_TOKENS).write_text(json.dumps({"codes": self.codes, "token_ids": self.token_ids.tolist(),
                                                       "version": self.version}))

    # --- inputs ---------------------------------------------------------------------------------
    def inputs(self, frames: list[np.ndarray], goals: list[str]) -> dict[str, torch.Tensor]:
        """Batch of prompts `[IMG(x_t)] "Goal: g"` in the chat template, ready for the model."""
        if len(frames) != len(goals) or not frames:
            raise ValueError(f"need one goal per frame and at least one frame, got {len(frames)} and {len(goals)}")
        batch = image_prompts(self.tokenizer, self.image_processor, frames,
                              [chat_prompt(self.tokenizer, g) for g in goals], self.device)
        if self.adapter is not None:
            batch["frames"] = torch.from_numpy(np.stack([np.asarray(f, np.uint8) for f in frames])).to(self.device)
        return batch

    def _feeding(self, batch: dict[str, torch.Tensor]):
        """The frames of `batch` handed to the frame adapter for the next forward pass (a no-op without one)."""
        from contextlib import contextmanager

        @contextmanager
        def feeding():
            if self.adapter is None:
                yield
                return
            self.adapter.frames = batch["frames"]
            try:
                yield
            finally:
                self.adapter.frames = None

        return feeding()

    # --- decoding -------------------------------------------------------------------------------
    @torch.no_grad()
    def propose(self, frames: list[np.ndarray], goals: list[str], candidates: int, length: int,
                temperature: float = 0.7, top_p: float = 0.9, seed: int | None = None,
                distinct_first: bool = False) -> Proposals:
        """B candidate sequences of exactly L codes per (frame, goal), with their log-probabilities.
        `distinct_first`: the B first codes are drawn without replacement (Gumbel-top-k) from the
        first code's distribution at T without the nucleus, so the candidates start apart; the rest of
        each sequence is sampled as usual. Their log-probabilities are then the first code's under that
        distribution plus the rest's under the sampling distribution."""
        from transformers import LogitsProcessor, LogitsProcessorList

        allowed = self.token_ids.to(self.device)
        n = len(frames)
        sample = temperature > 0
        draws = candidates if sample else 1  # greedy: the B candidates are one sequence
        spread = distinct_first and sample and draws > 1

        class PhysCodeSampling(LogitsProcessor):
            """Scores become the sampling distribution's log-probabilities over the PhysCode tokens."""

            first_logp = None

            def __call__(self, input_ids, scores):
                out = torch.full_like(scores, float("-inf"))
                if spread and self.first_logp is None:  # first step: B distinct codes per prompt
                    full = torch.log_softmax(scores[:, allowed].float() / temperature, -1).view(n, draws, -1)[:, 0]
                    keys = full - torch.log(-torch.log(torch.rand_like(full).clamp_min(1e-20)))
                    chosen = keys.topk(min(draws, full.shape[-1]), -1).indices
                    turn = torch.arange(draws, device=chosen.device) % chosen.shape[-1]  # repeats only when K < B
                    chosen = chosen[:, turn].reshape(-1)  # (n * draws,)
                    rows = torch.arange(len(chosen), device=scores.device)
                    self.first_logp = full.repeat_interleave(draws, 0)[rows, chosen]
                    out[rows, allowed[chosen]] = 0.0
                    return out
                out[:, allowed] = sampling_logprobs(scores[:, allowed], temperature, top_p).to(scores.dtype)
                return out

        if seed is not None:
            torch.manual_seed(seed)
        batch = self.inputs(frames, goals)
        self.model.eval()
        processor = PhysCodeSampling()
        model_inputs = {k: v for k, v in batch.items() if k != "frames"}
        with self._feeding(batch):
            # generate's own warpers are off (1.0 / 0 override the checkpoint's generation_config):
            # the processor alone defines the distribution.
            out = self.model.generate(
                **model_inputs, max_new_tokens=length, min_new_tokens=length, num_return_sequences=draws,
                do_sample=sample, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                logits_processor=LogitsProcessorList([processor]), output_scores=True,
                return_dict_in_generate=True, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=None)
        tokens = out.sequences[:, -length:]
        scores = torch.stack(out.scores, 1).float()  # the sampling distribution's log-probabilities
        logp = scores.gather(-1, tokens[..., None])[..., 0].sum(-1)
        if processor.first_logp is not None:
            logp = logp + processor.first_logp
        codes = self.codes_of(tokens).view(n, draws, length).cpu().numpy()
        logp = logp.view(n, draws).cpu().numpy()
        if not sample:
            codes, logp = np.repeat(codes, candidates, 1), np.repeat(logp, candidates, 1)
        return Proposals(codes, logp, self.version)

    def codes_of(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.cpu().apply_(lambda t: self._code_of.get(int(t), -1)).to(tokens.device)

    def sequence_logprobs(self, batch: dict[str, torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced log pi(c_l | prompt, c_<l) of each code of each sequence: (N, L), with
        gradients. `batch` holds one prompt per row of `codes` (N, L)."""
        tokens = self.token_ids.to(self.device)[codes]
        logits = self.teacher_forced_logits(batch, codes)
        return torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]

    def code_logits(self, batch: dict[str, torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (N, L, K) of the K PhysCode tokens at the positions that predict each code."""
        return self.teacher_forced_logits(batch, codes)[..., self.token_ids.to(self.device)]

    def teacher_forced_logits(self, batch: dict[str, torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
        """Logits (N, L, vocab) of the positions that predict each code, the codes fed as context."""
        tokens = self.token_ids.to(self.device)[codes]
        length = tokens.shape[1]
        ids = torch.cat([batch["input_ids"], tokens], 1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(tokens)], 1)
        mm = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(tokens, dtype=batch["mm_token_type_ids"].dtype)], 1)
        with self._feeding(batch):
            out = self.model(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm,
                             pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"], use_cache=False)
        return out.logits[:, -length - 1:-1].float()

    def repeat(self, batch: dict[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
        """Each prompt of `batch` `times` times in a row (to score B candidates of one prompt)."""
        out = {k: v.repeat_interleave(times, 0) for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
        sizes = (batch["image_grid_thw"].prod(-1)).tolist()
        chunks = torch.split(batch["pixel_values"], sizes)
        out["pixel_values"] = torch.cat([c for c in chunks for _ in range(times)])
        out["image_grid_thw"] = batch["image_grid_thw"].repeat_interleave(times, 0)
        return out

    # --- weights --------------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def update_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        self.model.load_state_dict(state)
        self.version = version
