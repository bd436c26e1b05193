"""Prompt tuning (Lester et al. 2021): ``n`` trainable embeddings inserted into the input.

``[e_cls, P, e_1 .. e_T]`` (BERT family) or ``[P, e_1 .. e_T]``: the input's embeddings ``e`` with the
trained ``P`` (n x d) inserted, and the attention mask widened with ones, before the first layer.
Reference: google-research/prompt-tuning ``prompt_tuning/prompts.py`` (``Prompt``) with
``configs/models/t5_1_1_prompt.gin`` (length 100, ``uniform(scale=0.5)`` init); for UniPELT's prompt layer
(``join="embeddings"``) adapter-hub/adapters ``methods/prompt_tuning.py`` (``PromptTuning``).

Text models: the prompt goes after ``[CLS]`` in encoders that start with a summary token (BERT
family), else at the start (GPT-2, LLaMA, T5's and BART's encoder input). The model's call is
rewritten before it runs: ``n`` placeholder ids are inserted into ``input_ids`` (so code that reads
the ids, such as GPT-2's last-token pooling, still works), the attention mask, token types,
token-level labels and QA positions are widened to match, and the embedding layer's output at the
placeholders is replaced by the prompt. Token-level outputs (token-classification and QA logits,
hidden states) come back without the prompt positions, so callers see their own sequence length;
the QA loss never picks a prompt position. Given ``position_ids`` (as ``generate`` passes them)
are widened too. Encoder-decoder models get the prompt in their encoder's input, also when the
encoder runs on its own (``generate``).
ViT: the prompt is inserted after ``[CLS]`` into the patch embeddings (shallow visual prompt).

``join="embeddings"`` is the prompt layer of adapters' ``PromptTuningConfig`` (adapter-hub/adapters
``methods/prompt_tuning.py``), which the seed's UniPELT + prompt builds on: the prompt joins the embedding
layer's *output*, after the position and token-type embeddings and the embeddings' LayerNorm, so it has no
position of its own; ``position="start"`` is adapters' ``combine="prefix"`` (in front of [CLS]),
``"after_cls"`` its ``"prefix_after_bos"``. For models with such an embeddings module (BERT-like encoders).

Init: embeddings of ``n`` random vocabulary tokens (``init="vocab"``, peft's ``SAMPLE_VOCAB``),
``U(-0.5, 0.5)`` (``init="uniform"``: Lester et al.'s, google-research/prompt-tuning
``configs/models/t5_1_1_prompt.gin``, and adapters'), or N(0, 0.02^2) (``init="random"``). Not identity at init
(it adds tokens); not mergeable. ``n d`` parameters. Decoder-only generation with a key/value cache is not
supported (use ``prefix``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn

from ..config import ConfigError, MethodConfig
from ..registry import register_method
from ..runtime import Installer, call_arguments
from ..sites import ModelMap
from .base import DeltaMethod

POSITIONS = ("auto", "start", "after_cls")
INITS = ("vocab", "uniform", "random")
JOINS = ("input", "embeddings", "auto")


@dataclass
class PromptConfig(MethodConfig):
    method = "prompt"
    description = "prompt tuning: n trainable input embeddings (after [CLS] in BERT-like encoders)"

    length: int = 20
    init: str = "vocab"
    position: str = "auto"
    seed: int = 0
    # "input": ids of placeholders the word embeddings fill; "embeddings": the embeddings' output; "auto": the
    # embeddings' output where the model has an embeddings module (BERT-like encoders), else the input
    join: str = "input"

    def validate(self) -> None:
        super().validate()
        self.require_positive_ints("length")
        if self.init not in INITS:
            raise ConfigError(f"prompt init must be one of {INITS}, got {self.init!r}")
        if self.position not in POSITIONS:
            raise ConfigError(f"prompt position must be one of {POSITIONS}, got {self.position!r}")
        if self.join not in JOINS:
            raise ConfigError(f"prompt join must be one of {JOINS}, got {self.join!r}")


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    """``parts`` joined along the sequence, leaving out empty ones (the piece before a prompt at the start):
    a lone piece needs no copy, and an empty slice would still cost a full-size gradient in backward."""
    parts = [t for t in parts if t.shape[1]]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _insert(t: torch.Tensor, pos: int, n: int, fill: Any) -> torch.Tensor:
    pad = torch.full((t.shape[0], n, *t.shape[2:]), fill, dtype=t.dtype, device=t.device)
    return _join([t[:, :pos], pad, t[:, pos:]])


def _remove(t: torch.Tensor, pos: int, n: int) -> torch.Tensor:
    return _join([t[:, :pos], t[:, pos + n:]])


# Multi-task serving: the one insertion of placeholders that the served tasks' prompts share (the first to
# run makes it; each then writes its prompt into its own rows), as (position, length, sequence length after)
SHARED_INSERT = ("prompt", "served insertion")


def embeddings_module(model_map: ModelMap) -> nn.Module | None:
    """The module after the word embeddings whose output the layers read (BERT-like encoders' ``embeddings``:
    positions, token types, LayerNorm), or None where the model has none."""
    model = model_map.model
    embeddings = getattr(model.base_model, "embeddings", None)
    if not isinstance(embeddings, nn.Module) or embeddings is model_map.input_embeddings() \
            or getattr(model.config, "is_encoder_decoder", False):
        return None
    return embeddings


def joins_after_embeddings(join: str, model_map: ModelMap) -> bool:
    """Whether a text prompt of this ``join`` goes after the embeddings module (``"auto"``: where there is one)."""
    return join == "embeddings" or (join == "auto" and embeddings_module(model_map) is not None)


def learned_positions(model: nn.Module) -> int | None:
    """How many positions the model's learned absolute position embeddings hold (GPT-2's ``wpe``, BERT's and
    BART's), which a prompt inserted into the input uses up too; None where positions are relative or rotary."""
    for path, module in model.named_modules():
        if isinstance(module, nn.Embedding) and path.rsplit(".", 1)[-1] in ("wpe", "position_embeddings",
                                                                            "embed_positions"):
            pad = module.padding_idx  # RoBERTa counts positions from its padding id + 1
            return module.num_embeddings - getattr(module, "offset", 0) - (pad + 1 if pad is not None else 0)
    return None


@register_method(PromptConfig)
class Prompt(DeltaMethod):
    quantized_base = True  # runs on bitsandbytes 4-/8-bit layers: reads and writes W through Projection
    # multi-task serving, where every served task has a prompt of one length and position (load_tasks checks)
    serves_rows = True

    def __init__(self, config: PromptConfig, model_map: ModelMap):
        super().__init__(config, model_map)
        model = model_map.model
        self.vision = model_map.family.name == "vit"
        after_cls = model_map.family.prompt_after_cls
        self.position = {"auto": 1 if after_cls else 0, "start": 0, "after_cls": 1}[config.position]
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        pad = getattr(model.config, "pad_token_id", None)
        self.placeholder = int(pad) if pad is not None else 0
        d = model_map.hidden_size
        gen = torch.Generator().manual_seed(config.seed)
        # Kept out of the module tree: the embedding layer is the base model's, not this delta's.
        self.__dict__["encoder"] = None
        self.after_embeddings = self.vision or joins_after_embeddings(config.join, model_map)
        if self.after_embeddings:
            embeddings = embeddings_module(model_map)
            if embeddings is None:
                raise ConfigError(f"prompt join='embeddings' needs an embeddings module after the word embeddings "
                                  f"(BERT-like encoders); {type(model).__name__} has none: use join='input'")
            self.__dict__["embed_module"] = embeddings
            words = model_map.input_embeddings()
        else:
            # The embedding layer the input really goes through: T5's and BART's encoders have their own
            # (in transformers 5 not the module get_input_embeddings() returns, which only shares its weight).
            get_encoder = getattr(model, "get_encoder", None)
            encoder = get_encoder() if callable(get_encoder) else None
            encoder = encoder if isinstance(encoder, nn.Module) and encoder is not model else None
            try:
                embed = encoder.get_input_embeddings() if encoder is not None else None
            except (AttributeError, NotImplementedError):
                embed = None
            self.__dict__["embed_module"] = embed if isinstance(embed, nn.Module) else model_map.input_embeddings()
            if self.encoder_decoder:
                self.__dict__["encoder"] = encoder
            words = self.embed_module
        self.position_limit = None if self.after_embeddings else learned_positions(model)
        if self.position_limit is not None and config.length >= self.position_limit:
            raise ConfigError(f"{config.method} length {config.length} leaves no room for the input in "
                              f"{type(model).__name__}'s {self.position_limit} positions; use a length below "
                              f"{self.position_limit} (the prompt and the input share them)")
        if config.init == "vocab" and not self.vision:  # a ViT has no vocabulary: N(0, 0.02) there
            init = self._vocab_rows(words, gen)
        elif config.init == "uniform":
            init = torch.rand(config.length, d, generator=gen) - 0.5
        else:
            init = torch.randn(config.length, d, generator=gen) * 0.02
        self.embedding = nn.Parameter(init.clone())

    def _vocab_rows(self, word_embeddings: nn.Module, gen: torch.Generator) -> torch.Tensor:
        """The word embeddings of ``length`` random vocabulary tokens."""
        vocab = word_embeddings.weight.shape[0]
        ids = torch.randint(0, vocab, (1, self.config.length), generator=gen).to(word_embeddings.weight.device)
        with torch.no_grad():
            return word_embeddings(ids)[0].float().cpu()

    def saved_config(self) -> PromptConfig:
        """The config as saved: ``join`` resolved for this model (``"auto"`` becomes what it chose)."""
        return replace(self.config, join="embeddings" if self.after_embeddings and not self.vision else
                       ("input" if self.config.join == "auto" else self.config.join))

    reads_inputs = False  # whether row_prompts looks at the inputs (ATTEMPT) or only at their shape

    def row_prompts(self, inputs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The prompt of each row, (batch, length, d), given the rows' input embeddings (batch, seq, d) and
        padding mask; a prompt-tuning delta gives every row the same (ATTEMPT mixes per row)."""
        return self.embedding.to(inputs.dtype).unsqueeze(0).expand(inputs.shape[0], -1, -1)

    def install(self, installer: Installer) -> None:
        values = installer.context.values
        slot = (id(self), "insert")
        n, pos = self.config.length, self.position

        def served_rows() -> torch.Tensor | None:
            rows = installer.row_mask()
            return None if rows is None else rows.view(-1, 1, 1)

        def real_mask(width: int) -> torch.Tensor | None:
            """The padding mask of the real tokens (without the prompt's positions), when it fits."""
            mask = installer.context.padding_mask
            if mask is not None and mask.shape[1] == width + n:
                mask = _remove(mask, pos, n)
            return mask if mask is not None and mask.shape[1] == width else None

        def prompt_for(embedded: torch.Tensor) -> torch.Tensor:
            """Each row's prompt for a sequence whose placeholders sit at pos..pos+n."""
            if not self.reads_inputs:
                return self.row_prompts(embedded, None)  # the same for every row: no copy of the inputs
            real = _remove(embedded, pos, n)
            return self.row_prompts(real, real_mask(real.shape[1]))

        def fill_prompt(module, inputs, output):
            # Vision: insert into the patch sequence. Text: overwrite the placeholders, or insert after the
            # embeddings (join="embeddings") where the call's rewrite asked for it.
            if self.vision:
                return _join([output[:, :pos], self.row_prompts(output, None), output[:, pos:]])
            if self.after_embeddings:
                expected = values.pop(slot, None)
                if expected is None or output.shape[1] != expected:
                    return output
                return _join([output[:, :pos], self.row_prompts(output, real_mask(output.shape[1])), output[:, pos:]])
            rows = served_rows()
            if rows is not None:  # served among other tasks: this prompt goes into its own rows only
                shared = values.get(SHARED_INSERT)
                if shared is None or output.shape[1] != shared[2]:
                    return output
                mine = torch.where(rows.to(output.device), prompt_for(output), output[:, pos:pos + n])
                return _join([output[:, :pos], mine, output[:, pos + n:]])
            expected = values.pop(slot, None)
            if expected is None or output.shape[1] != expected:
                return output
            return _join([output[:, :pos], prompt_for(output), output[:, pos + n:]])

        installer.on_output(self.embed_module, fill_prompt)
        if self.vision:
            return

        ready = (id(self), "encoder_ready")

        def insert_input(kwargs: dict[str, Any]) -> int:
            """Insert the prompt into ``input_ids`` or ``inputs_embeds`` and widen the mask; the length before."""
            ids, embeds, mask = kwargs.get("input_ids"), kwargs.get("inputs_embeds"), kwargs.get("attention_mask")
            limit = self.position_limit
            if limit is not None and (ids if ids is not None else embeds).shape[1] + n > limit:
                raise ConfigError(f"an input of {(ids if ids is not None else embeds).shape[1]} tokens and a prompt "
                                  f"of {n} exceed the model's {limit} positions; truncate inputs to {limit - n} tokens")
            if self.after_embeddings:  # the embeddings' output gets the prompt (fill_prompt); the ids stay
                length = (ids if ids is not None else embeds).shape[1]
                values[slot] = length
            elif ids is not None:
                length = ids.shape[1]
                kwargs["input_ids"] = _insert(ids, pos, n, self.placeholder)
                values[slot] = length + n
            else:
                length = embeds.shape[1]
                plain = mask if mask is not None and mask.shape[1] == length else None
                kwargs["inputs_embeds"] = _join([embeds[:, :pos], self.row_prompts(embeds, plain), embeds[:, pos:]])
            if mask is not None and mask.shape[1] == length:
                kwargs["attention_mask"] = _insert(mask, pos, n, 1)
            return length

        def rewrite(kwargs: dict[str, Any]) -> dict[str, Any]:
            if kwargs.get("input_ids") is None and kwargs.get("inputs_embeds") is None:
                # encoder-decoder step with encoder_outputs given: widen the cross-attention mask only
                enc, mask = kwargs.get("encoder_outputs"), kwargs.get("attention_mask")
                enc_len = enc[0].shape[1] if enc is not None else None
                if mask is not None and enc_len is not None and mask.shape[1] == enc_len - n:
                    kwargs["attention_mask"] = _insert(mask, pos, n, 1)
                return kwargs
            # the cache is ``past_key_values`` up to transformers 5.23, ``cache`` from 5.24
            cache = kwargs.get("past_key_values", kwargs.get("cache"))
            if not self.encoder_decoder and cache is not None:
                raise NotImplementedError("prompt tuning does not support cached generation in decoder-only "
                                          "models; use prefix tuning, or generate with use_cache=False")
            rows = served_rows()
            if rows is not None and SHARED_INSERT in values:
                # another served task's prompt inserted the placeholders (and moved labels and positions)
                embeds = kwargs.get("inputs_embeds")
                if embeds is not None:
                    mine = torch.where(rows.to(embeds.device), prompt_for(embeds), embeds[:, pos:pos + n])
                    kwargs["inputs_embeds"] = _join([embeds[:, :pos], mine, embeds[:, pos + n:]])
                return kwargs
            length = insert_input(kwargs)
            if rows is not None:
                values[SHARED_INSERT] = (pos, n, length + n)
            values[(id(self), "length")] = length
            if self.encoder is not None:
                values[ready] = True
            if kwargs.get("token_type_ids") is not None and not self.after_embeddings:
                kwargs["token_type_ids"] = _insert(kwargs["token_type_ids"], pos, n, 0)
            position_ids = kwargs.get("position_ids")
            if position_ids is not None and not self.after_embeddings:
                # the prompt takes the positions after the token before it; later tokens move by n
                first = position_ids[:, pos - 1:pos] + 1 if pos > 0 else torch.zeros_like(position_ids[:, :1])
                steps = torch.arange(n, device=position_ids.device, dtype=position_ids.dtype)
                kwargs["position_ids"] = torch.cat([position_ids[:, :pos], first + steps, position_ids[:, pos:] + n],
                                                   dim=1)
            labels = kwargs.get("labels")
            if labels is not None and not self.encoder_decoder and labels.dim() == 2 and labels.shape[1] == length:
                kwargs["labels"] = _insert(labels, pos, n, -100)
            for name in ("start_positions", "end_positions"):
                if kwargs.get(name) is not None:
                    p = kwargs[name]
                    kwargs[name] = torch.where(p >= pos, p + n, p)
            return kwargs

        def strip(kwargs: dict[str, Any], output: Any) -> Any:
            length = values.pop((id(self), "length"), None)
            if length is None or self.encoder_decoder or not hasattr(output, "keys"):
                return output
            for name, ndim in (("logits", 3), ("start_logits", 2), ("end_logits", 2), ("last_hidden_state", 3)):
                t = output.get(name) if hasattr(output, "get") else None
                if isinstance(t, torch.Tensor) and t.dim() == ndim and t.shape[1] == length + n:
                    output[name] = _remove(t, pos, n)
            return output

        def hide_from_qa(module, inputs, output):
            # QA heads score every position; the loss must not count the prompt's as candidates.
            length = values.get((id(self), "length"))
            if length is None or output.dim() != 3 or output.shape[1] != length + n:
                return output
            prompt_positions = torch.zeros(output.shape[1], 1, dtype=torch.bool, device=output.device)
            prompt_positions[pos:pos + n] = True
            return output.masked_fill(prompt_positions, torch.finfo(output.dtype).min)

        def encoder_input(module, args, kwargs):
            # The encoder run on its own (generate() does): insert the prompt there.
            if values.pop(ready, False):
                return None  # the model's call already inserted it
            call = call_arguments(module, args, kwargs)
            if call.get("input_ids") is None and call.get("inputs_embeds") is None:
                return None
            insert_input(call)
            installer.context.use_mask(call.get("attention_mask"))
            return (), call

        installer.rewrite_call(rewrite)
        installer.rewrite_output(strip)
        qa_head = getattr(installer.model, "qa_outputs", None)
        if isinstance(qa_head, nn.Module) and not self.encoder_decoder:
            installer.on_output(qa_head, hide_from_qa)
        if self.encoder is not None:
            installer.on_call(self.encoder, encoder_input)
