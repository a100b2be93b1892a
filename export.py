"""Export a checkpoint of train.py or dpo.py as a Hugging Face folder, to run it elsewhere.

    python export.py --ckpt out/tiny --out hf/tiny              # MiniCPM's released layout
    python export.py --ckpt out/tiny --out hf/tiny-llama --llama  # Llama's: no custom code anywhere
    python export.py --ckpt out/big --out out/big-one --single    # a sharded (--fsdp) run -> ckpt.pt

The default layout is the released MiniCPM one (config.json with scale_emb, scale_depth,
dim_model_base): this project's `sample.py --hf` and `dpo.py --hf` read it, and so does MiniCPM's
own modeling code (transformers with trust_remote_code). --llama folds the muP multipliers into the
weights (embedding x scale_emb, o_proj and down_proj x scale_depth / sqrt(L), an untied head /
(d / dim_model_base)) and writes `model_type: llama`: transformers' LlamaForCausalLM, vLLM and
llama.cpp's convert_hf_to_gguf.py load it as they load any Llama, with the same logits. MoE models
have no Llama layout and are refused.

--ckpt may be a sharded checkpoint (train.py --fsdp): its slices are assembled whole, in one process.
--single writes that as one ckpt.pt (optimizer and run state included, so `train.py --resume` continues
it in one process or under DDP) with the tokenizer file beside it, instead of a Hugging Face folder.

Both layouts get the tokenizer twice: tokenizer_record.json (+ the BPE rank file), which sample.py
reads with tiktoken, and tokenizer.json + tokenizer_config.json, which transformers'
AutoTokenizer reads and which encode every text to the same ids.
"""
import os
import shutil
import sys
from dataclasses import dataclass

import torch

import checkpoint
import cli
import hf
import tokenizer
from cli import UsageError, flag


# The flags. --dtype is the file's, not the computation's: bf16 halves the folder (the 2.4B: ~5 GB)
# and is what the releases ship; float32 keeps the weights exactly as trained.
@dataclass
class ExportConfig:
    ckpt: str = flag("out/tiny", "checkpoint to export: ckpt.pt or the run folder holding it (any kind)")
    out: str = flag("", "the folder to write (required)")
    llama: bool = flag(False, "Llama layout (muP folded into the weights) instead of MiniCPM's released one")
    dtype: str = flag("float32", "weights' dtype in the folder: float32, bfloat16 or float16")
    overwrite: bool = flag(False, "replace the files of a folder that already holds an export")
    single: bool = flag(False, "write --out/ckpt.pt (this project's single file) instead of a Hugging Face folder")


def check_out(cfg):
    """The folder is new, empty, or --overwrite says its files may be replaced."""
    # an export into a folder holding other files would mix two models' configs and weights
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError(f"--out {cfg.out} is a file: give a folder")
    if os.path.isdir(cfg.out) and os.listdir(cfg.out) and not cfg.overwrite:
        raise UsageError(f"--out {cfg.out} is not empty: choose another folder, or --overwrite to replace its files")


def run(argv):
    """Flags -> checkpoint and tokenizer loaded and checked -> the folder written."""
    cfg = cli.dataclass_flags(ExportConfig, __doc__, argv)
    cli.check([(not cfg.out, "--out is required: the folder to write"),
               (cfg.dtype not in ("float32", "bfloat16", "float16"), "--dtype must be float32, bfloat16 or float16"),
               (cfg.single and (cfg.llama or cfg.dtype != "float32"), "--single keeps the checkpoint as trained: drop --llama and --dtype")])
    check_out(cfg)
    # everything read and checked before the first file is written: a refused export leaves nothing
    ckpt = checkpoint.load(cfg.ckpt)
    if cfg.single:
        return write_single(ckpt, cfg)
    # any kind (pretrain, dpo): the weights and architecture are all an export needs, not the optimizer
    model = checkpoint.build_model(ckpt).to(getattr(torch, cfg.dtype))
    record, rank_file = ckpt["tokenizer"], checkpoint.rank_file_path(ckpt)
    # the tokenizer loads now, so a missing rank file fails before the first file is written; its EOT id
    # becomes the config's eos_token_id, where transformers' generate stops (as sample.py does)
    enc = tokenizer.load_tokenizer(record["spec"], rank_file)
    if cfg.llama:
        hf.check_llama(model.config)   # a MoE model is refused here, before the folder exists
    hf.save_hf(model, cfg.out, tokenizer_record=record, llama=cfg.llama, eos_id=enc.eot_token)
    if rank_file:   # beside the weights, as the record says: the folder is self-contained
        shutil.copyfile(rank_file, os.path.join(cfg.out, record["rank_file"]))
    # tokenizer.json: the same pre-split regex, merges recovered from the ranks, <|endoftext|> special,
    # no BOS (our models never saw one), so AutoTokenizer gives the ids tiktoken gives. A released
    # tokenizer.json (a dpo.py run on a released folder) was copied above as the rank file; tiktoken's
    # named encodings have official Hugging Face counterparts (e.g. "gpt2"), so none is written for them.
    if record["spec"] == tokenizer.RELEASED_TOKENIZER:
        config = os.path.join(os.path.dirname(rank_file), "tokenizer_config.json")
        if os.path.isfile(config):   # its BOS rule
            shutil.copyfile(config, os.path.join(cfg.out, "tokenizer_config.json"))
    elif record["spec"] == "byte" or record["spec"].startswith("bpe:"):
        tokenizer.write_hf_tokenizer(cfg.out, enc)
    else:
        print(f"export.py: note: no tokenizer.json for {record['spec']}: use its Hugging Face tokenizer", file=sys.stderr)
    layout = "Llama (LlamaForCausalLM)" if cfg.llama else "MiniCPM's released layout"
    print(f"export.py: {ckpt['path']} -> {cfg.out}: {layout}, {cfg.dtype}, "
          f"{model.num_params(non_embedding=False):,} parameters, tokenizer {record['spec']}")


def write_single(ckpt, cfg):
    """ckpt.pt as train.py writes it, from a checkpoint of any form (a sharded one: assembled whole)."""
    # every key but our own bookkeeping (path, the sharded folder) goes in: weights, optimizer moments,
    # step, data position, config, RNG, so the run continues exactly from the file
    state = {k: v for k, v in ckpt.items() if k not in ("path", "sharded")}
    rank_file = checkpoint.rank_file_path(ckpt)
    os.makedirs(cfg.out, exist_ok=True)
    checkpoint.atomic_save(state, os.path.join(cfg.out, "ckpt.pt"))
    if rank_file:   # the tokenizer beside it, as the record says: sample.py and a resume find it
        shutil.copyfile(rank_file, os.path.join(cfg.out, ckpt["tokenizer"]["rank_file"]))
    print(f"export.py: {ckpt['path']} -> {os.path.join(cfg.out, 'ckpt.pt')} (step {ckpt['step']})")


def main(argv=None):
    return cli.main("export.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
