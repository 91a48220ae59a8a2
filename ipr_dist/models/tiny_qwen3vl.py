"""The embedded default policy backbone: a small model of the real Qwen3-VL architecture, built
locally with no download, saved in the same format as a released checkpoint.

Its tokenizer is a byte-level BPE trained here on the games' own words (annotations, goals, control
descriptions, the prompt format), with Qwen's special tokens and a Qwen-style chat template; its
image processor is transformers' `Qwen2VLImageProcessorPil` (no torchvision). Weights are random:
the alignment stage is what teaches it. Every code path of the 8B model (chat template, image
placeholder expansion, M-RoPE, DeepStack, PhysCode tokens, generation, log-probabilities,
gradients) runs on it on a CPU in seconds.
"""

from __future__ import annotations

import json

from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def corpus() -> list[str]:
    """Text the tokenizer is trained on: every bundled game annotation (HTML pack included), the
    game ids, and the prompt format. Byte-level BPE still encodes any other text."""
    from ipr_dist.games import list_games
    from ipr_dist.games.catalog import load_annotations

    annotations = load_annotations()
    games = list_games(annotations)
    notes = [*annotations.values(), *(g.annotation for g in games if g.annotation is not None)]
    texts = ["Goal: ", "You are playing a game. Choose the next actions.", "user", "assistant", "system"]
    for a in notes:
        texts += [a.goal or "", " ".join(a.physics), " ".join(a.causal), *a.controls.values()]
    texts += [g.id for g in games]
    return [t for t in texts if t]


VIDEO_PROCESSOR_CONFIG = "video_preprocessor_config.json"


def build_tiny(path: str | Path, hidden: int = 64, layers: int = 2, vision_hidden: int = 32, vision_depth: int = 2,
               vocab: int = 1024, image_pixels: int = 64 * 64, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # show_progress off: off a terminal its bars print as blank lines in the console (and in `ray job logs`)
    bpe.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL_TOKENS,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                          show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=SPECIAL_TOKENS[1:])
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # Qwen3-VL's 16-pixel patches merged 2 x 2: a 64 x 64 frame is 4 x 4 patches, 4 image tokens.
    image_processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                               min_pixels=32 * 32, max_pixels=image_pixels)
    head_dim = 16
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // head_dim,
                         num_key_value_heads=max(1, hidden // head_dim // 2), head_dim=head_dim,
                         max_position_embeddings=4096, pad_token_id=ids["<|endoftext|>"],
                         rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                          "mrope_section": [4, 2, 2], "mrope_interleaved": True}),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_heads=2, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           out_hidden_size=hidden, num_position_embeddings=64,
                           deepstack_visual_indexes=list(range(vision_depth - 1))),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    # The video processor's config, as a released checkpoint ships it (vLLM builds Qwen3-VL's whole
    # processor from the directory; the policy never feeds video, and the server admits none).
    (path / VIDEO_PROCESSOR_CONFIG).write_text(json.dumps({
        "video_processor_type": "Qwen3VLVideoProcessor", "processor_class": "Qwen3VLProcessor",
        "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
        "size": {"shortest_edge": 32 * 32, "longest_edge": image_pixels},
        "image_mean": list(image_processor.image_mean), "image_std": list(image_processor.image_std)}, indent=2))
    return path
