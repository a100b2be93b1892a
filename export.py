"""Export a checkpoint of train.py or dpo.py as a Hugging Face folder, to run it elsewhere.

    python export.py --ckpt out/tiny --out hf/tiny              # MiniCPM's released layout
    python export.py --ckpt out/tiny --out hf/tiny-llama --llama  # Llama's: no custom code anywhere
    python export.py --ckpt out/big --out out/big-one --single    # a sharded (--fsdp) run -> ckpt.pt
    python export.py --ckpt out/tiny --gguf tiny.gguf            # one GGUF file for llama.cpp

The default layout is the released MiniCPM one (config.json with scale_emb, scale_depth,
dim_model_base): this project's `sample.py --hf` and `dpo.py --hf` read it, and so does MiniCPM's
own modeling code (transformers with trust_remote_code). --llama folds the muP multipliers into the
weights (embedding x scale_emb, o_proj and down_proj x scale_depth / sqrt(L), an untied head /
(d / dim_model_base)) and writes `model_type: llama`: transformers' LlamaForCausalLM, vLLM and
llama.cpp's convert_hf_to_gguf.py load it as they load any Llama, with the same logits (the weights
are written as model.safetensors). MoE models have no Llama layout and are refused.

--gguf writes the same folded Llama as one GGUF file, llama.cpp's format, with the `gguf` package
(pip install gguf): no conversion step, and no need for convert_hf_to_gguf.py, which accepts only
tokenizers whose ids hash to a published vocabulary's. The tokenizer goes in whole (tokens, merges,
the name of its pre-split: our GPT-4 split is llama.cpp's "llama-bpe"), with <|endoftext|> as BOS and
EOS and no BOS added, as our models were trained. A released tokenizer.json (train.py --init_from or
dpo.py on a MiniCPM folder) goes in as llama.cpp's SentencePiece ("llama") vocabulary, each piece scored
by its first merge's rank, with the folder's BOS/EOS and BOS rule (gguf_spm.py: why that reproduces the
merges, and what is refused). --gguf_dtype f16/bf16 rounds the folded weights (norm gains stay f32, as
llama.cpp's own converter keeps them). tiktoken's named encodings are refused;
tools/llama_cpp_check.py runs the file in llama.cpp and compares every id with ours.

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

import atomic
import checkpoint
import cli
import gguf_spm
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
    gguf: str = flag("", "write one GGUF file (llama.cpp's format, Llama layout) to this path instead of a folder")
    gguf_dtype: str = flag("f32", "tensor type of the --gguf file: f32, f16 or bf16")


def check_out(cfg):
    """The folder is new, empty, or --overwrite says its files may be replaced."""
    # an export into a folder holding other files would mix two models' configs and weights
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError(f"--out {cfg.out} is a file: give a folder")
    if os.path.isdir(cfg.out) and os.listdir(cfg.out) and not cfg.overwrite:
        raise UsageError(f"--out {cfg.out} is not empty: choose another folder, or --overwrite to replace its files")
    cli.check_writable(cfg.out, "--out")   # /proc, a read-only disk: before the checkpoint is read


def check_not_input(out, ckpt, flag="--out"):
    """The output is neither the checkpoint's own folder nor a folder holding it: --overwrite would replace
    the files being read (a run folder's metrics.jsonl, a Hugging Face folder's config.json) half-way."""
    src = os.path.realpath(ckpt if os.path.isdir(ckpt) else os.path.dirname(os.path.abspath(ckpt)))
    dst = os.path.realpath(out)
    if src == dst or src.startswith(dst.rstrip(os.sep) + os.sep) or dst == os.path.realpath(checkpoint.ckpt_path(ckpt)):
        raise UsageError(f"{flag} {out} is or holds the checkpoint being exported ({ckpt}): write outside it")


def run(argv):
    """Flags -> checkpoint and tokenizer loaded and checked -> the folder written."""
    cfg = cli.dataclass_flags(ExportConfig, __doc__, argv)
    if cfg.gguf:
        return export_gguf(cfg)
    cli.check([(not cfg.out, "--out is required: the folder to write (or --gguf FILE)"),
               (cfg.dtype not in ("float32", "bfloat16", "float16"), "--dtype must be float32, bfloat16 or float16"),
               (cfg.single and (cfg.llama or cfg.dtype != "float32"), "--single keeps the checkpoint as trained: drop --llama and --dtype")])
    check_not_input(cfg.out, cfg.ckpt)
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
        hf.import_safetensors()        # and a missing package, which writes the weights
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
    atomic.atomic_save(state, os.path.join(cfg.out, "ckpt.pt"))
    if rank_file:   # the tokenizer beside it, as the record says: sample.py and a resume find it
        shutil.copyfile(rank_file, os.path.join(cfg.out, ckpt["tokenizer"]["rank_file"]))
    print(f"export.py: {ckpt['path']} -> {os.path.join(cfg.out, 'ckpt.pt')} (step {ckpt['step']})")


# ----------------------------------------------------------------------------- GGUF (llama.cpp)

GGUF_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# A GGUF names its tokenizer's pre-split instead of storing the regex: llama.cpp has one built-in
# implementation per name. "llama-bpe" is GPT-4's split (Llama 3 took cl100k's), and it looks a whole
# chunk up before merging, as tiktoken does. A pattern not listed here has no known twin: refused.
PRE_TOKENIZERS = {tokenizer.GPT4_SPLIT: "llama-bpe"}
NORMAL, CONTROL, UNUSED = 1, 3, 5   # llama.cpp's token types (gguf.TokenType)


def import_gguf():
    try:
        import gguf   # optional: only --gguf needs it
    except ImportError:
        raise UsageError("--gguf needs the gguf package (ggml's GGUF writer): pip install gguf==0.19.0") from None
    return gguf


def gguf_pre(pattern):
    """The name llama.cpp knows a tokenizer's pre-split regex by."""
    if pattern not in PRE_TOKENIZERS:
        raise UsageError(f"the tokenizer's pre-split regex {pattern[:40]!r}... has no llama.cpp pre-tokenizer known to "
                         "export.py (only GPT-4's split, llama.cpp's 'llama-bpe'): it cannot be written to GGUF")
    return PRE_TOKENIZERS[pattern]


def check_gguf_out(cfg):
    """The --gguf path is a file, new or --overwrite, and the other flags are folder flags."""
    cli.check([(cfg.gguf_dtype not in GGUF_DTYPES, f"--gguf_dtype {cfg.gguf_dtype!r} must be f32, f16 or bf16"),
               (bool(cfg.out or cfg.llama or cfg.single), "--gguf writes one file: drop --out, --llama and --single"),
               (cfg.dtype != "float32", "--gguf takes --gguf_dtype (f32, f16, bf16), not --dtype"),
               (os.path.isdir(cfg.gguf), f"--gguf {cfg.gguf} is a folder: give a file path, e.g. model.gguf"),
               (os.path.isfile(cfg.gguf) and not cfg.overwrite, f"--gguf {cfg.gguf} exists: --overwrite to replace it")])


def gguf_vocab(enc, vocab_size):
    """-> (token strings, token types, merges) as llama.cpp's "gpt2" (byte-level BPE) vocabulary reads them."""
    # the same spelling as tokenizer.json: each byte one printable character, so no token holds a space
    # and a merge line "a b" splits at its one space; <|endoftext|> is a control token (never text)
    specials = {enc.encode_single_token(t): t for t in enc.special_tokens_set}
    spell = tokenizer.byte_unicode_map()
    ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i not in specials}
    tokens = [specials.get(i) or "".join(spell[b] for b in enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]
    types = [CONTROL if i in specials else NORMAL for i in range(enc.n_vocab)]
    # rows of the embedding past the tokenizer (a padded vocabulary) are never produced by it
    tokens += [f"[PAD{i}]" for i in range(enc.n_vocab, vocab_size)]
    types += [UNUSED] * (vocab_size - enc.n_vocab)
    merges = [f"{''.join(spell[b] for b in a)} {''.join(spell[b] for b in b_)}" for a, b_ in tokenizer.recover_merges(ranks)]
    # the byte tokenizer has no merges, but llama.cpp requires the key and GGUF has no empty arrays: one
    # merge of two strings that are no symbol (merges only join symbols, and there are no others)
    return tokens, types, merges or ["ĠĠ ĠĠ"]


def write_byte_level_vocab(w, enc, pre, vocab_size):
    """Our bpe:N or byte tokenizer as llama.cpp's "gpt2" vocabulary, with its pre-split's name."""
    tokens, types, merges = gguf_vocab(enc, vocab_size)
    w.add_tokenizer_model("gpt2")   # llama.cpp's name for a byte-level BPE
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    # <|endoftext|> both: it separated our training documents, and a model never saw another BOS;
    # not added to prompts (llama-bpe's default would add one), as sample.py adds none
    w.add_bos_token_id(enc.eot_token)
    w.add_eos_token_id(enc.eot_token)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def interleave_rope_rows(w, n_heads):
    """Rows of q_proj/k_proj [n_heads * hd, d] reordered for llama.cpp's RoPE: [x0 x1 | x2 x3 ...]."""
    # we rotate the pairs (x_j, x_{j + hd/2}) ("rotate half"), llama.cpp's llama rotates (x_2j, x_2j+1):
    # row 2j + c of a head takes our row c * hd/2 + j, so the same pairs rotate by the same angles
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, -1).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model, gguf):
    """-> {GGUF name: float32 tensor}: hf.py's folded Llama state, q and k rows interleaved."""
    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layer)
    out = {}
    for name, w in hf.llama_state(model).items():   # muP folded in: a plain Llama computes the same
        if name.endswith("self_attn.q_proj.weight"):
            w = interleave_rope_rows(w, cfg.n_head)
        elif name.endswith("self_attn.k_proj.weight"):
            w = interleave_rope_rows(w, cfg.n_kv_head)
        out[names.get_name(name, try_suffixes=(".weight",))] = w.float()
    return out


def write_gguf(model, add_vocab, path, dtype, gguf):
    """The whole GGUF: llama.cpp's llama metadata, the tokenizer (add_vocab(writer)), the tensors; atomically."""
    cfg = model.config
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp-{os.path.basename(path)}")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling == "linear":   # positions / factor: llama.cpp's freq_scale = 1 / factor
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_factor)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    add_vocab(w)
    for name, t in gguf_tensors(model, gguf).items():
        if t.dim() == 1 or dtype == "f32":   # norm gains stay f32, as llama.cpp's converter keeps them
            w.add_tensor(name, t.numpy())
        elif dtype == "f16":
            w.add_tensor(name, t.half().numpy())
        else:   # numpy has no bfloat16: the raw 16 bits, typed BF16 in the file
            w.add_tensor(name, t.bfloat16().view(torch.int16).numpy(), raw_dtype=gguf.GGMLQuantizationType.BF16)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)   # a reader never sees half a file, and a failed write keeps the old one
    except BaseException:
        w.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def export_gguf(cfg):
    """--gguf: every check (flags, model, tokenizer, package) before the file is opened."""
    check_gguf_out(cfg)
    cli.check_writable(os.path.dirname(os.path.abspath(cfg.gguf)), f"--gguf {cfg.gguf}: its folder")
    if os.path.isfile(cfg.gguf):   # a file to replace: never the checkpoint itself
        check_not_input(cfg.gguf, cfg.ckpt, "--gguf")
    ckpt = checkpoint.load(cfg.ckpt)
    model = checkpoint.build_model(ckpt).float()   # folded in float32, then rounded once to --gguf_dtype
    if model.config.n_experts:   # llama.cpp's MoE architectures are not MiniCPM-MoE's routing, unchecked: refused
        raise UsageError("--gguf writes the llama architecture, which has no experts: a MoE model cannot be written "
                         "(export it without --gguf, in MiniCPM-MoE's released layout)")
    if model.config.rope_scaling == "dynamic":   # exact up to block_size, where dynamic NTK starts
        print(f"export.py: note: llama.cpp has no dynamic NTK RoPE for llama: the file computes our logits up to "
              f"context_length {model.config.block_size}, not beyond", file=sys.stderr)
    spec, rank_file = ckpt["tokenizer"]["spec"], checkpoint.rank_file_path(ckpt)
    if spec == tokenizer.RELEASED_TOKENIZER:   # SentencePiece-style: llama.cpp's "llama" vocabulary, scored (gguf_spm.py)
        vocab = gguf_spm.vocabulary(rank_file, tokenizer.load_tokenizer(spec, rank_file), model.config.vocab_size)
        add_vocab, pre = (lambda w: gguf_spm.write(w, vocab)), "llama, SentencePiece-style"
        if vocab["note"]:
            print(f"export.py: note: {vocab['note']}", file=sys.stderr)
    elif spec == "byte" or spec.startswith("bpe:"):
        enc = tokenizer.load_tokenizer(spec, rank_file)
        pre = gguf_pre(enc._pat_str)   # tiktoken keeps the regex only in this attribute
        add_vocab = lambda w: write_byte_level_vocab(w, enc, pre, model.config.vocab_size)   # noqa: E731
    else:   # tiktoken's named encodings: their pre-splits have names of their own in llama.cpp, unchecked
        raise UsageError(f"--gguf writes this project's tokenizers (bpe:N, byte) and released tokenizer.json files, not "
                         f"{spec} (a named vocabulary, its split not ours): export --llama and use llama.cpp's convert_hf_to_gguf.py")
    gguf = import_gguf()
    os.makedirs(os.path.dirname(os.path.abspath(cfg.gguf)), exist_ok=True)
    write_gguf(model, add_vocab, cfg.gguf, cfg.gguf_dtype, gguf)
    print(f"export.py: {ckpt['path']} -> {cfg.gguf}: GGUF (llama.cpp, llama architecture), {cfg.gguf_dtype}, "
          f"{model.num_params(non_embedding=False):,} parameters, tokenizer {spec} ({pre})")


def main(argv=None):
    return cli.main("export.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
