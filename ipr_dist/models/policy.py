"""The vision-language policy: Qwen3-VL whose tokenizer is extended with K PhysCode tokens (paper
Sec. 10.2 Stage 3), so latent actions are emitted by ordinary decoding.

  prompt:  [IMG(x_t)] "Goal: g"   ->   <PC_c1> ... <PC_cL>

A checkpoint is a plain Qwen3-VL directory (config.json, safetensors, tokenizer with its chat
template, preprocessor_config.json) plus `physcode_tokens.json`, the map code index <-> token id.
Loading a base checkpoint without that file adds the K tokens (embeddings grown when the new ids
pass their end, never shrunk; the PhysCode rows drawn around the trained rows' mean). Images are preprocessed by transformers' `Qwen2VLImageProcessorPil`, so no
torchvision is needed; the image placeholder is expanded here the way Qwen3-VL's processor does.

The policy's probability of a sequence is the product of the model's next-token probabilities at
temperature 1 over the whole vocabulary. Decoding is constrained (every other token masked), so a
proposal is always exactly L valid codes; temperature and top-p shape sampling only, and the
returned log-probabilities are the policy's own, which is what GRPO's ratio needs and what a
teacher-forced forward pass recomputes (`sequence_logprobs`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ipr_dist.errors import ConfigError

PHYSCODE_TOKENS = "physcode_tokens.json"
IMAGE_PAD = "<|image_pad|>"
PROCESSOR_FILES = ("video_preprocessor_config.json", "processor_config.json", "chat_template.json",
                   "chat_template.jinja")


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
        self.model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device)
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
        self.model.save_pretrained(out, state_dict=state_dict)
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
        return image_prompts(self.tokenizer, self.image_processor, frames,
                             [chat_prompt(self.tokenizer, g) for g in goals], self.device)

    # --- decoding -------------------------------------------------------------------------------
    @torch.no_grad()
    def propose(self, frames: list[np.ndarray], goals: list[str], candidates: int, length: int,
                temperature: float = 0.7, top_p: float = 0.9, seed: int | None = None) -> Proposals:
        """B candidate sequences of exactly L codes per (frame, goal), with their log-probabilities."""
        from transformers import LogitsProcessor, LogitsProcessorList

        allowed = self.token_ids.to(self.device)

        class PhysCodeOnly(LogitsProcessor):
            def __call__(self, input_ids, scores):
                masked = torch.full_like(scores, float("-inf"))
                masked[:, allowed] = scores[:, allowed]
                return masked

        if seed is not None:
            torch.manual_seed(seed)
        batch = self.inputs(frames, goals)
        self.model.eval()
        sample = temperature > 0
        draws = candidates if sample else 1  # greedy: the B candidates are one sequence
        out = self.model.generate(
            **batch, max_new_tokens=length, min_new_tokens=length, num_return_sequences=draws,
            do_sample=sample, temperature=temperature if temperature > 0 else None,
            top_p=top_p if temperature > 0 else None, top_k=None,
            logits_processor=LogitsProcessorList([PhysCodeOnly()]), output_logits=True, return_dict_in_generate=True,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=None)
        tokens = out.sequences[:, -length:]
        logits = torch.stack(out.logits, 1).float()  # raw logits, before masking and temperature
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0].sum(-1)
        n = len(frames)
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

    def teacher_forced_logits(self, batch: dict[str, torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
        """Logits (N, L, vocab) of the positions that predict each code, the codes fed as context."""
        tokens = self.token_ids.to(self.device)[codes]
        length = tokens.shape[1]
        ids = torch.cat([batch["input_ids"], tokens], 1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(tokens)], 1)
        mm = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(tokens, dtype=batch["mm_token_type_ids"].dtype)], 1)
        out = self.model(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, pixel_values=batch["pixel_values"],
                         image_grid_thw=batch["image_grid_thw"], use_cache=False)
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
