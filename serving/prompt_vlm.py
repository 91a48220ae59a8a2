"""The prompt-only VLM baseline (paper Sec. 10.4): a pretrained VLM, no fine-tuning, prompted each
step with the game overview, the annotated action space, the goal and the step context, and asked
for one JSON object with THOUGHT, MEMORY and ACTION. Only ACTION is executed; an answer whose
action does not parse or is not on the menu is played as a no-op and counted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import ray

from ipr_dist.games.catalog import GameInfo
from ipr_dist.models.policy import IMAGE_PAD

OUTPUT_FORMAT = ('Respond with only one JSON object, no other text: {"thought": "what you see and why you choose '
                 'the action", "memory": "a short note to keep for later steps", "action": "<one action name '
                 'from the list>"}')


def game_overview(game: GameInfo) -> str:
    a = game.annotation
    lines = [f"You are an AI agent playing {game.id}, a {a.category + ' ' if a and a.category else ''}game "
             f"({game.kind}, {game.platform}) controlled with "
             f"{'the keyboard and the mouse' if game.uses_mouse else 'buttons'}."]
    if a and a.physics:
        lines.append("Physics: " + "; ".join(a.physics) + ".")
    if a and a.causal:
        lines.append("Causes and effects: " + "; ".join(a.causal) + ".")
    return " ".join(lines)


def action_space(game: GameInfo, names: list[str]) -> str:
    meanings = game.annotation.controls if game.annotation else {}
    lines = []
    for name in names:
        key = name.removeprefix("press ")
        if name.startswith("press ") and key in meanings:
            lines.append(f"- {name}: {meanings[key]}")
        elif name.startswith(("move ", "hold ")):
            lines.append(f"- {name}: {'move the pointer to' if name.startswith('move') else 'press and hold at'} "
                         "x,y (fractions of the screen width and height)")
        else:
            lines.append(f"- {name}" + (": do nothing this step" if name == "noop" else ""))
    return "\n".join(lines)


def build_prompt(game: GameInfo, names: list[str], goal: str, history: list[str], memory: str,
                 objects: list[dict] | None = None) -> str:
    """The four parts of the paper's prompt: overview, action space, task and goal, step context (with
    the boxes of a desktop game's object detector, when it has one)."""
    recent = ", ".join(history) if history else "none yet"
    seen = ""
    if objects is not None:
        boxes = "; ".join(f"{o['label']} at [{', '.join(f'{v:.2f}' for v in o['box'])}]" for o in objects[:16])
        seen = f" Detected objects (x0, y0, x1, y1 as fractions of the frame): {boxes or 'none'}."
    return "\n\n".join([
        game_overview(game),
        "Action space (choose exactly one name):\n" + action_space(game, names),
        f"Task and goal: {goal}",
        f"Step context: the image is the current frame.{seen} Recent actions: {recent}. Memory: {memory or 'empty'}.",
        OUTPUT_FORMAT])


@dataclass
class ParsedAnswer:
    action: int | None  # index into the menu; None: invalid (played as a no-op)
    memory: str


def parse_answer(text: str, names: list[str]) -> ParsedAnswer:
    """The first JSON object in the answer; its "action" must be one of the menu's names."""
    match = re.search(r"\{.*\}", text, re.DOTALL)
    if not match:
        return ParsedAnswer(None, "")
    try:
        obj = json.loads(match.group(0))
    except json.JSONDecodeError:
        return ParsedAnswer(None, "")
    if not isinstance(obj, dict):
        return ParsedAnswer(None, "")
    memory = str(obj.get("memory", ""))[:500]
    action = str(obj.get("action", "")).strip().lower()
    lowered = [n.lower() for n in names]
    return ParsedAnswer(lowered.index(action) if action in lowered else None, memory)


class PromptVLM:
    """A Qwen3-VL checkpoint answering the prompt in its chat template, greedy decoding."""

    def __init__(self, path: str, max_new_tokens: int, device: str = "cpu"):
        from pathlib import Path

        from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from ipr_dist.errors import ConfigError

        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"{path}: not a Qwen3-VL checkpoint (no config.json); set eval.vlm_path to a local "
                              "checkpoint directory")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
        self.model = Qwen3VLForConditionalGeneration.from_pretrained(path).to(device).eval()
        self.device, self.max_new_tokens = device, max_new_tokens

    def answer(self, frames: list[np.ndarray], prompts: list[str]) -> list[str]:
        import torch

        from ipr_dist.models.policy import image_prompts

        texts = []
        for p in prompts:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}]
            texts.append(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        assert all(IMAGE_PAD in t for t in texts), "the chat template lost the image placeholder"
        batch = image_prompts(self.tokenizer, self.image_processor, frames, texts, self.device)
        with torch.no_grad():
            out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


@ray.remote(max_restarts=-1, max_task_retries=-1)
class PromptVLMServer:
    def __init__(self, source, max_new_tokens: int):
        """`source`: a run's checkpoint (CheckpointRef) or a local checkpoint directory."""
        import torch

        from ipr_dist.run_layout import as_ref

        torch.set_num_threads(1)
        with as_ref(source).open() as path:
            self.vlm = PromptVLM(str(path), max_new_tokens, "cuda" if torch.cuda.is_available() else "cpu")

    def answer(self, frames: list[np.ndarray], prompts: list[str]) -> list[str]:
        return self.vlm.answer(frames, prompts)
