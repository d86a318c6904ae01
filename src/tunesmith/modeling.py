"""The model as training runs it: loaded for a method (lora, qlora, full), and its loss.

Shared by train and by estimate's calibration (which times real training steps), so the
estimate measures exactly the setup training uses: dtypes, PEFT wrapping, bf16 autocast, the
loss computed only at trained positions.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

from tunesmith import runs
from tunesmith.config import RunConfig
from tunesmith.errors import UserError
from tunesmith.formatting import IGNORE_INDEX, Example, collate
from tunesmith.inference import cache_kwarg


def load_for_training(cfg: RunConfig, device, bf16: bool, fsdp: bool = False):
    """(model, loaded): the model ready to train (PEFT-wrapped for lora/qlora), on `device`.

    Under FSDP every weight is stored fp32 (an FSDP unit all-gathers one dtype); autocast still
    computes in bf16.
    """
    import torch

    from tunesmith.models import load_model

    t = cfg.train
    name = runs.base_model_ref(cfg)  # a relative folder is relative to the config, as everywhere
    common = dict(expected_fingerprint=cfg.model.expected_fingerprint, **runs.tokenizer_options(cfg, recorded=False))
    if t.method == "full":
        # Full fine-tuning keeps fp32 master weights; bf16 is only the autocast compute.
        loaded = load_model(name, dtype=torch.float32, device=device, **common)
        model = loaded.model
        model.requires_grad_(True)
    else:
        # bitsandbytes (imported by peft when installed) warns at import about an optional
        # kernel download it cannot do offline; the NF4 CPU path works without it.
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        from peft import LoraConfig, get_peft_model

        if t.method == "qlora":
            quant = qlora_config(bf16)
            # Unquantized parts (embeddings, norms) stay fp32, so the residual stream does.
            loaded = load_model(name, dtype=torch.float32, quantization_config=quant, device=device, **common)
            if device.type == "cuda":  # load_model leaves quantized models where they loaded
                loaded.model.to(device)
        else:
            store_bf16 = bf16 and not fsdp
            loaded = load_model(name, dtype=torch.bfloat16 if store_bf16 else torch.float32, device=device, **common)
            if store_bf16:
                # The frozen projections are stored in bf16, the dtype autocast computes them in:
                # no per-step weight casts, half their memory. Embeddings and norms go back to
                # fp32, so the residual stream stays fp32 (a bf16 residual stream loses accuracy).
                embeddings = loaded.model.get_input_embeddings().weight
                for module in loaded.model.modules():
                    if not isinstance(module, torch.nn.Linear) or module.weight is embeddings:
                        for param in module.parameters(recurse=False):
                            param.data = param.data.float()
        lora = t.lora
        peft_config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            use_rslora=lora.use_rslora,
            bias="none",
            task_type="CAUSAL_LM",
        )
        # peft keeps adapter weights in fp32 over a bf16 base (autocast_adapter_dtype), so the
        # LoRA update and the optimizer state stay accurate.
        model = get_peft_model(loaded.model, peft_config)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return model, loaded


def qlora_config(bf16: bool):
    import torch

    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise UserError("train.method qlora needs bitsandbytes", 'pip install "bitsandbytes>=0.50"') from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32,
        bnb_4bit_quant_storage=torch.uint8,
    )


def causal_lm(model):
    """The HF *ForCausalLM inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def loss_at_trained_positions(model, input_ids, labels, position_ids, shared_prefix_len: int = 0):
    """Summed cross-entropy over trained positions only.

    The backbone gives hidden states; the vocabulary projection runs only on positions whose
    next token is trained (a few percent of them in domain fine-tuning, and the projection
    is a large share of a small model's compute). With `shared_prefix_len` K > 0, every row
    starts with the same K tokens: they run once with batch 1, and their keys/values are
    repeated over the batch, so gradients flow back through the prefix as in the plain path.
    """
    import torch.nn.functional as F

    lm = causal_lm(model)
    backbone, head = lm.get_decoder(), lm.get_output_embeddings()
    k = shared_prefix_len
    if k > 0:
        prefix = backbone(input_ids=input_ids[:1, :k], position_ids=position_ids[:1, :k], use_cache=True)
        cache_kw = cache_kwarg(backbone)  # transformers 5 names the cache `cache`; 4.x `past_key_values`
        cache = prefix[cache_kw]
        cache.batch_repeat_interleave(input_ids.shape[0])
        hidden = backbone(
            input_ids=input_ids[:, k:], position_ids=position_ids[:, k:], use_cache=True, **{cache_kw: cache}
        ).last_hidden_state
        labels = labels[:, k:]
    else:
        hidden = backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    logits = model_logits(lm, head(hidden[:, :-1][trained]).float())
    return F.cross_entropy(logits, targets[trained], reduction="sum")


def model_logits(lm, logits):
    """The head's output through the model's own logit transforms, as its forward applies them.

    Granite divides by `logits_scaling`, Cohere multiplies by `logit_scale`, Gemma 2 and later
    soft-cap with `final_logit_softcapping`: without them training would optimise another
    objective than the one inference samples from. A transform not listed here is caught at
    start-up by `check_loss_matches_model`.
    """
    import torch

    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None and scaling != 1:
        logits = logits / scaling
    scale = getattr(lm, "logit_scale", getattr(config, "logit_scale", None))
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def check_loss_matches_model(model, examples: list[Example], pad_id: int, device, bf16: bool) -> None:
    """Refuse to train when our loss on one example differs from the model's own
    `model(..., labels=...).loss`: the loss skips the full logits for speed, so it must prove
    it computes the model's objective (an unknown logit transform would make it differ)."""
    import torch

    tensors = collate(examples, [[0]], pad_id)
    input_ids, labels, position_ids = (tensors[k].to(device) for k in ("input_ids", "labels", "position_ids"))
    was_training = model.training
    model.eval()  # no dropout: the two forwards must see the same network
    with torch.no_grad(), autocast(device, bf16):
        ours = float(loss_at_trained_positions(model, input_ids, labels, position_ids)) / tensors["trained_tokens"]
        theirs = float(model(input_ids=input_ids, position_ids=position_ids, labels=labels, use_cache=False).loss)
    model.train(was_training)
    tolerance = 2e-2 if bf16 else 1e-4
    if not abs(ours - theirs) <= tolerance * max(abs(theirs), 1e-6):
        model_type = causal_lm(model).config.model_type
        raise RuntimeError(
            f"the training loss ({ours:.6f}) differs from the model's own loss ({theirs:.6f}) on the first example: "
            f"{model_type} transforms its logits in a way modeling.model_logits does not apply; refusing to train another objective"
        )


def make_loss_module(model):
    """The model wrapped as one module whose forward is the loss, so DDP and compile see it whole."""
    import torch

    class _Loss(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, labels, position_ids, shared_prefix_len: int = 0):
            return loss_at_trained_positions(self.model, input_ids, labels, position_ids, shared_prefix_len)

    return _Loss(model)


def autocast(device, bf16: bool):
    import torch

    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
