#!/usr/bin/env bash
# A full run on the GPU machine: GPU tests, then the benchmarks with their transformers
# baselines. Logs go to $OUT (or ./gpu-logs). Usage, from the project root on that machine:
#   bash benchmarks/run_gpu.sh [tests|tests-kernels|tests-shapes|tests-engine|decode|sampled|sampling|draws|topp|persistent|small|smallbatch|bursts|pipeline|readahead|splitcfg|levers|ab|host|workloads|prefill|shared|all]
# ('sampled': decode.py sampling as ChatBraid does by default (temperature 0.7), with top-p and top-k;
# 'small': one layer's decode attention, FlashInfer's forms and ours, and graph_timeline.py, each kernel's share
# of a decode step or a fresh prompt in its graph; 'bursts': interleave.py, streams while a long
# prompt arrives; 'pipeline': decode.py with bursts pipelined and not, and profile_step's idle share each way;
# 'readahead': decode.py at batch 1 and 4 with the kernels reading ahead of their wait and not;
# 'splitcfg': decode.py at batch 1 and 4 with the split-KV attention's settings and the ones before;
# 'smallbatch': the row kernels at 1-8 rows against cuBLAS, and decode.py at batches 1-16 with the row
# kernels for batch 1 alone and with our decode attention up to 4 sequences, each against the defaults;
# 'host': what lies outside a fresh prompt's prefill graph, the host's part of its step, and what a graph launch costs;
# 'levers': decode.py at batch 1 and 2 with each of two kernel switches the other way, against the defaults,
# and whole prompts with PDL_RMS_NORM each way;
# 'draws': decode.py sampled, each burst's draw in a graph of its own and op by op;
# 'sampling': sampling.py, each filter's draw a step; decode.py at temperature 0.7 alone, the draw in our kernels and in torch,
# and at Qwen3's settings with top-k's threshold from our kernels and from torch.topk;
# 'persistent': persistent_layer.py, a batch-1 step's matmuls in one kernel reading ahead of its waits, against the row kernels;
# 'ab': decode.py at batch 1 and 2 for an older tree at $OLD and this one, in alternating processes)
# 'tests' takes ~8.5 min on a fresh H100 (514 s of its 530 s timeout in session 10: run 'tests-kernels',
# 'tests-shapes' and 'tests-engine' apart; 'tests-kernels' alone outgrew 530 s on a fresh H100 in
# session 14 while Triton compiled every variant), 'decode' (decode.py, kernels.py, row_kernels.py, profile_step.py),
# 'workloads' (multiturn.py, chat_turn.py) and 'prefill' (prefill_attention.py; prefill.py three ways) a few
# minutes each on an H100, 'shared' (shared_prefix.py) up to 9: under a 10-minute limit per
# command, run them apart (each stage's timeouts add up to under 600 s).
# FlashInfer's JIT cache comes back as ficache.txz.* (xz, 15 MB parts), Triton's as tritoncache.txz.*;
# put them in .fictgz/ (git-ignored) and carry that next time: this script unpacks them before
# the first kernel is needed. (The machine goes back after ~30 s idle: a fresh one rebuilds both.)
set -u
OUT=${OUT:-gpu-logs}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
what=${1:-all}
if [ -d .ficache ]; then mkdir -p ~/.cache && cp -r .ficache ~/.cache/flashinfer; fi
unpack() {  # .fictgz/$1.txz.* (xz; through Python's lzma where there is no xz) or $1.tgz.* into $2
  mkdir -p "$2"
  if ls .fictgz/"$1".txz.* >/dev/null 2>&1; then
    if command -v xz >/dev/null; then cat .fictgz/"$1".txz.* | tar xJ -C "$2"
    else cat .fictgz/"$1".txz.* | python3 -c "import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall(sys.argv[1])" "$2"; fi
  elif ls .fictgz/"$1".tgz.* >/dev/null 2>&1; then cat .fictgz/"$1".tgz.* | tar xz -C "$2"; fi
}
unpack ficache ~/.cache
# Triton's compiled kernels likewise (a fresh machine otherwise compiles every kernel variant again)
unpack tritoncache ~/.triton
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
# 'tests' runs them all; 'tests-kernels' (the kernel tests), 'tests-shapes' (kernels at Qwen3's shapes
# in bf16, FlashInfer backend) and 'tests-engine' (graphs, bf16 engine against transformers) split them, should the whole outgrow one command
case "$what" in
  tests|all) tests="tests/kernels tests/gpu" ;;
  tests-kernels) tests="tests/kernels" ;;
  tests-shapes) tests="tests/gpu/test_kernels_qwen3_shapes.py tests/gpu/test_flashinfer_backend.py" ;;
  tests-engine) tests="tests/gpu/test_cuda_graphs.py tests/gpu/test_engine_bf16.py tests/gpu/test_sampling_filters.py" ;;
  *) tests="" ;;
esac
if [ -n "$tests" ]; then
  # shellcheck disable=SC2086
  timeout 530 python3 -m pytest -q -s -p no:cacheprovider --durations=15 $tests > "$OUT/gpu_tests.log" 2>&1
  grep -E "rel err|relative error|divergence|FAILED|Error" "$OUT/gpu_tests.log" | head -60
  tail -22 "$OUT/gpu_tests.log"
fi
if [ "$what" = decode ] || [ "$what" = all ]; then
  timeout 250 python3 -m benchmarks.decode --shape qwen3-0.6b --device cuda --dtype bfloat16 \
    --batch 1 8 32 128 --compiled-batches 1 --kv-gb 16 2>&1 | grep -v Warning | tail -12 | tee "$OUT/decode.log"
  timeout 90 python3 -m benchmarks.kernels --tokens 1 32 2048 2>&1 | grep -v Warning | tee "$OUT/kernels.log"
  timeout 70 python3 -m benchmarks.row_kernels 2>&1 | grep -v Warning | tee "$OUT/row_kernels.log"
  timeout 40 python3 -m benchmarks.row_kernels --hops 2>&1 | grep -v Warning | tee "$OUT/row_kernels_hops.log"
  timeout 150 python3 -m benchmarks.profile_step --shape qwen3-0.6b --device cuda --dtype bfloat16 \
    > "$OUT/profile_step.log" 2>&1; grep -E "tokens/s|^  |first token|GPU idle|no graph" "$OUT/profile_step.log" | head -44
fi
if [ "$what" = sampled ]; then
  # the same table sampled (ChatBraid's default temperature, with top-p and top-k): the engine's
  # sampler, transformers' warpers and the filters inside the compiled step
  timeout 420 python3 -m benchmarks.decode --shape qwen3-0.6b --device cuda --dtype bfloat16 \
    --batch 1 8 32 --compiled-batches 1 --kv-gb 8 --temperature 0.7 --top-p 0.95 --top-k 20 2>&1 \
    | grep -E "^card|^batch|^ +[0-9]+ |Error" | tee "$OUT/decode_sampled.log"
fi
if [ "$what" = sampling ]; then
  # what each filter's draw costs a step (GPU and host), then the engine at ChatBraid's default (temperature
  # 0.7 alone) with the draw in our kernels (kernels.FUSED_SAMPLING) and in torch, two engines in turn
  timeout 90 python3 -m benchmarks.sampling 2>&1 | grep -v Warning | tee "$OUT/sampling.log"
  timeout 240 python3 -m benchmarks.decode --shape qwen3-0.6b --device cuda --dtype bfloat16 --batch 1 32 \
    --compiled-batches --kv-gb 8 --skip-transformers --temperature 0.7 --compare-fused-sampling 2>&1 \
    | grep -E "^card|^batch|^ +[0-9]+ |sampled tokens|Error" | tee "$OUT/decode_temperature.log"
  # top-k alone, its threshold from our kernels (kernels.FUSED_TOP_K) and from torch.topk (a row that also
  # cuts top-p takes torch.topk's values: sampling._top_k_top_p)
  timeout 240 python3 -m benchmarks.decode --shape qwen3-0.6b --device cuda --dtype bfloat16 --batch 1 32 \
    --compiled-batches --kv-gb 8 --skip-transformers --temperature 0.7 --top-k 20 --compare-fused-top-k \
    2>&1 | grep -E "^card|^batch|^ +[0-9]+ |top-k threshold|Error" | tee "$OUT/decode_top_k.log"
fi
if [ "$what" = topp ]; then
  # top-p after top-k by the keep rule from our kernels (kernels.FUSED_TOP_P, kernels/topp.py): their tests
  # at Qwen3's vocabulary (compiled, bf16), each filter's draw a step (sampling.py: "+ top-p kernels"
  # beside the row sorted, the GPU's default, and the sort-free cut in torch), then the engine at Qwen3's
  # settings with the kernels against without, two engines in turn in one process. (Sorted against
  # sort-free in the engine: decode.py --top-p-cut; session 21's sampling.py table settled it)
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_topp.py 2>&1 | tail -5 \
    | tee "$OUT/topp_tests.log"
  timeout 90 python3 -m benchmarks.sampling 2>&1 | grep -v Warning | tee "$OUT/sampling.log"
  timeout 240 python3 -m benchmarks.decode --shape qwen3-0.6b --device cuda --dtype bfloat16 --batch 1 32 \
    --compiled-batches --kv-gb 8 --skip-transformers --temperature 0.6 --top-p 0.95 --top-k 20 --compare-fused-top-p \
    2>&1 | grep -E "^card|^batch|^ +[0-9]+ |top-p keep rule|Error" | tee "$OUT/decode_fused_top_p.log"
fi
if [ "$what" = draws ]; then
  # sampled bursts drawing their tokens in a CUDA graph of their own (model_runner.DRAW_GRAPH_ROWS) against
  # launched op by op, two engines in turn: Qwen3's settings, seeded, then at batch 1 unseeded (ChatBraid's
  # requests, drawing from the default generator), then temperature alone (ChatBraid's fallback)
  timeout 300 python3 -m benchmarks.decode --shape qwen3-0.6b --device cuda --dtype bfloat16 --batch 1 8 16 \
    --compiled-batches --kv-gb 8 --skip-transformers --temperature 0.6 --top-p 0.95 --top-k 20 --compare-draw-graphs \
    2>&1 | grep -E "^card|^batch|^ +[0-9]+ |draws|Error" | tee "$OUT/decode_draws.log"
  timeout 130 python3 -m benchmarks.decode --shape qwen3-0.6b --device cuda --dtype bfloat16 --batch 1 \
    --compiled-batches --kv-gb 8 --skip-transformers --temperature 0.6 --top-p 0.95 --top-k 20 --unseeded \
    --compare-draw-graphs 2>&1 | grep -E "^card|^batch|^ +[0-9]+ |draws|Error" | tee "$OUT/decode_draws_unseeded.log"
  timeout 130 python3 -m benchmarks.decode --shape qwen3-0.6b --device cuda --dtype bfloat16 --batch 1 \
    --compiled-batches --kv-gb 8 --skip-transformers --temperature 0.7 --compare-draw-graphs \
    2>&1 | grep -E "^card|^batch|^ +[0-9]+ |draws|Error" | tee "$OUT/decode_draws_temperature.log"
fi
if [ "$what" = persistent ]; then
  # 28 layers' matmuls in one persistent kernel (one program an SM, then two) against the engine's chain of row kernels
  timeout 120 python3 -m benchmarks.persistent_layer --rows 8 16 2>&1 | grep -v Warning | tee "$OUT/persistent_layer.log"
  # all programs must be resident at once: 3 an SM fit only with 2 tiles ahead (registers)
  timeout 80 python3 -m benchmarks.persistent_layer --per-sm 2 --warps 4 --rows 8 --ahead 2 4 2>&1 | grep -v Warning \
    | tee "$OUT/persistent_layer_2.log"
  timeout 80 python3 -m benchmarks.persistent_layer --per-sm 3 --warps 4 --rows 8 --ahead 2 2>&1 | grep -v Warning \
    | tee "$OUT/persistent_layer_3.log"
fi
if [ "$what" = small ]; then
  # one layer's decode attention at batch 1 and 4: FlashInfer's forms against our split-KV kernel
  timeout 150 python3 -m benchmarks.decode_attention --batch 1 4 --kv 128 1024 4096 2>&1 | grep -v Warning \
    | tee "$OUT/decode_attention.log"
  # each kernel's share of a decode step, and of a fresh 1k/4k prompt, inside its graph (replays
  # back to back), and what lies outside the prompt's graph
  timeout 180 python3 -m benchmarks.graph_timeline --shape qwen3-0.6b --device cuda --dtype bfloat16 \
    --batch 1 8 32 --prefill 1024 4096 --kv-gb 4 2>&1 | grep -v Warning | tee "$OUT/graph_timeline.log"
fi
if [ "$what" = bursts ]; then
  # streams decoding while an 8k prompt arrives (their longest wait, the prompt's first token):
  # the prompt in 2,048-token chunks in forwards of their own (the default with graphs), then
  # mixed eager steps
  timeout 130 python3 -m benchmarks.interleave --shape qwen3-0.6b --device cuda --dtype bfloat16 --kv-gb 16 \
    2>&1 | grep -v Warning | tail -6 | tee "$OUT/interleave.log"
  timeout 130 python3 -m benchmarks.interleave --shape qwen3-0.6b --device cuda --dtype bfloat16 --kv-gb 16 \
    --chunk-while-decoding 0 --skip-transformers 2>&1 | grep -v Warning | tail -5 | tee "$OUT/interleave_mixed.log"
fi
if [ "$what" = pipeline ]; then
  # bursts pipelined (the default with graphs: the next launched before the last one's tokens are
  # read) against read in turn, alternating in one process, with their greedy tokens compared;
  # then profile_step's GPU idle share each way
  timeout 200 python3 -m benchmarks.decode --shape qwen3-0.6b --device cuda --dtype bfloat16 \
    --batch 1 32 --compiled-batches --kv-gb 16 --compare-pipelining 2>&1 | grep -v Warning \
    | grep -E "^card|^ +[0-9]+ |pipelined" | tee "$OUT/decode_pipeline.log"
  for m in "" "--no-pipeline-bursts"; do
    timeout 150 python3 -m benchmarks.profile_step --shape qwen3-0.6b --device cuda --dtype bfloat16 \
      $m > "$OUT/profile_step$m.log" 2>&1
    grep -E "tokens/s|GPU idle|no graph" "$OUT/profile_step$m.log" | head -12
  done
fi
if [ "$what" = readahead ]; then
  # the batch-1/8 decode kernels reading ahead of their programmatic-dependent wait against
  # waiting first (braid_engine.kernels.READ_AHEAD), two engines in turn in one process
  timeout 250 python3 -m benchmarks.decode --shape qwen3-0.6b --device cuda --dtype bfloat16 \
    --batch 1 4 --compiled-batches --kv-gb 8 --compare-read-ahead 2>&1 | grep -v Warning \
    | grep -E "^card|^ +[0-9]+ |reading ahead" | tee "$OUT/decode_read_ahead.log"
fi
if [ "$what" = splitcfg ]; then
  # the split-KV decode attention with its settings (braid_engine.kernels.SPLIT_KV_CONFIG, 64/64/4/1
  # since session 11) against the ones before (64 splits, 32-key tiles, 2 warps, 2 stages), two
  # engines in turn in one process
  timeout 250 python3 -m benchmarks.decode --shape qwen3-0.6b --device cuda --dtype bfloat16 \
    --batch 1 4 --compiled-batches --kv-gb 8 --compare-split-config 64/32/2/2 2>&1 | grep -v Warning \
    | grep -E "^card|^ +[0-9]+ |split-KV" | tee "$OUT/decode_split_config.log"
fi
if [ "$what" = smallbatch ]; then
  # small decode batches: the row kernels' matmuls at 1-8 rows against cuBLAS + the norm kernels, then
  # the engine with its defaults (row kernels up to kernels.ROW_KERNEL_ROWS, our decode attention up
  # to FlashInferBackend.small_decode_batch) against the row kernels for batch 1 alone, and against
  # our attention up to 4 sequences, engines in turn in one process
  timeout 120 python3 -m benchmarks.row_kernels --rows 1 2 3 4 8 2>&1 | grep -v Warning | tee "$OUT/row_kernels_rows.log"
  timeout 420 python3 -m benchmarks.decode --shape qwen3-0.6b --device cuda --dtype bfloat16 \
    --batch 1 2 4 8 16 --compiled-batches --kv-gb 8 --compare-row-rows 1 --compare-small-decode-batch 4 2>&1 \
    | grep -E "^card|^ +[0-9]+ |row kernels|decode attention" | tee "$OUT/decode_small_batches.log"
fi
if [ "$what" = levers ]; then
  # two switches (on since session 18): the first layer's qkv gathering its embeddings
  # (kernels.FOLD_EMBEDDING) and the standalone RMSNorm as a dependent launch (kernels.PDL_RMS_NORM),
  # each against an engine with it the other way, engines in turn in one process
  timeout 400 python3 -m benchmarks.decode --shape qwen3-0.6b --device cuda --dtype bfloat16 --batch 1 2 \
    --compiled-batches --kv-gb 8 --skip-transformers --compare-fold-embedding --compare-pdl-rms-norm 2>&1 \
    | grep -E "^card|^ +[0-9]+ |gathered|RMSNorm|Error" | tee "$OUT/decode_levers.log"
  # the RMSNorm switch reaches every norm of a prompt's step too: whole fresh prompts each way
  # (graphs up to 4,096 rows: two engines capturing up to 8,192 outgrew 150 s on a fresh H200)
  timeout 200 python3 -m benchmarks.prefill --shape qwen3-0.6b --device cuda --dtype bfloat16 --kv-gb 8 \
    --prefill-graph-tokens 4096 --tokens 1024 2048 4096 --repeat 11 --compare-switch PDL_RMS_NORM 2>&1 \
    | grep -E "^card|tokens:|Error" \
    | tee "$OUT/prefill_levers.log"
fi
if [ "$what" = ab ]; then
  # two builds of the engine side by side: the tree at $OLD (an older braid_engine/ beside this tree's
  # benchmarks/, e.g. `git archive COMMIT braid_engine | tar -x -C .fictgz/old && cp -r benchmarks
  # .fictgz/old/`, carried) against this one, in alternating processes, three rounds; then each
  # build's row_kernels --hops
  root=$PWD
  for i in 1 2 3; do
    for side in old new; do
      if [ $side = old ]; then cd "${OLD:?set OLD to the older tree}"; else cd "$root"; fi
      timeout 150 python3 -m benchmarks.decode --shape qwen3-0.6b --device cuda --dtype bfloat16 --batch 1 2 \
        --compiled-batches --kv-gb 4 --skip-transformers 2>&1 | grep -E "^ +[0-9]+ " | sed "s/^/$side $i /" \
        | tee -a "$OUT/ab_decode.log"
    done
  done
  for side in old new; do
    if [ $side = old ]; then cd "$OLD"; else cd "$root"; fi
    timeout 60 python3 -m benchmarks.row_kernels --hops 2>&1 | grep -v Warning | sed "s/^/$side /" | tee -a "$OUT/ab_hops.log"
  done
  cd "$root"
fi
if [ "$what" = host ]; then
  # what lies outside a fresh prompt's prefill graph: generate against the graph alone, then the
  # prompt stepped in the calling thread under cProfile (the host's part of the step)
  timeout 280 python3 -m benchmarks.graph_timeline --shape qwen3-0.6b --device cuda --dtype bfloat16 \
    --batch 1 --prefill 1024 4096 --host-profile 4096 1024 --launch --kv-gb 4 2>&1 | grep -v Warning > "$OUT/graph_timeline.log"
  grep -E "^fresh|^card|launched|kernels:" "$OUT/graph_timeline.log"; grep -A16 "stepped in this thread" "$OUT/graph_timeline.log"
fi
if [ "$what" = workloads ] || [ "$what" = all ]; then
  # transformers keeping its KV across turns, compiled with CUDA graphs (in a child process)
  timeout 420 python3 -m benchmarks.multiturn --shape qwen3-0.6b --device cuda --dtype bfloat16 \
    --system-tokens 8000 --turns 8 --kv-gb 8 --compiled-timeout 200 2>&1 | grep -v Warning | tail -26 \
    | tee "$OUT/multiturn.log"
  # the same kind of conversation through ChatBraid: the host's prompt preparation and the first chunk
  timeout 120 python3 -m benchmarks.chat_turn --shape qwen3-0.6b --device cuda --dtype bfloat16 --kv-gb 8 \
    2>&1 | grep -v Warning | tail -9 | tee "$OUT/chat_turn.log"
fi
if [ "$what" = prefill ] || [ "$what" = all ]; then
  # whole prompts: graphs up to 8,192 rows, those from 512 rows on fa3 (the default); fresh prompts
  # on their own k/v against through the pages, alternating in one process; all graphs on fa2
  # (--prefill-graph-tokens 256: long prompts eagerly); then one layer's prefill attention each way
  # the engine can run it (its kernels built by then)
  timeout 180 python3 -m benchmarks.prefill --shape qwen3-0.6b --device cuda --dtype bfloat16 --kv-gb 8 \
    --compiled-tokens 4096 --repeat 3 2>&1 | grep -v Warning | tail -6 | tee "$OUT/prefill.log"
  timeout 130 python3 -m benchmarks.prefill --shape qwen3-0.6b --device cuda --dtype bfloat16 --kv-gb 8 \
    --compare-fresh --tokens 1024 4096 16384 --repeat 5 2>&1 | grep -v Warning | tail -4 | tee "$OUT/prefill_compare_fresh.log"
  timeout 130 python3 -m benchmarks.prefill --shape qwen3-0.6b --device cuda --dtype bfloat16 --kv-gb 8 \
    --fa3-graph-rows 0 --compiled-tokens --repeat 3 2>&1 | grep -v Warning | tail -6 | tee "$OUT/prefill_fa2.log"
  timeout 150 python3 -m benchmarks.prefill_attention 2>&1 | grep -v Warning | tee "$OUT/prefill_attention.log"
fi
if [ "$what" = shared ] || [ "$what" = all ]; then
  # its transformers baselines (eager, then compiled at batch 64) take minutes: a stage of its own
  timeout 420 python3 -m benchmarks.shared_prefix --shape qwen3-0.6b --device cuda --dtype bfloat16 --kv-gb 16 \
    2>&1 | grep -v Warning | tail -9 | tee "$OUT/shared_prefix.log"
  # the engine's rows again without cascade twins of the decode graphs (a cascaded step runs eagerly)
  timeout 120 python3 -m benchmarks.shared_prefix --shape qwen3-0.6b --device cuda --dtype bfloat16 --kv-gb 16 \
    --cascade-graphs 0 --skip-transformers 2>&1 | grep -v Warning | tail -5 | tee "$OUT/shared_prefix_no_twins.log"
fi
# xz: a fifth of gzip's size for these (both caches ~13 MB against ~50), so they fit the carry
# beside the wheels
pack() {  # $2/$3 into $OUT/$1.txz.* (or .tgz.* where there is no xz), in 15 MB parts
  if command -v xz >/dev/null; then tar cf - -C "$2" "$3" 2>/dev/null | xz -6 -T0 | split -b 15M - "$OUT/$1.txz."
  else tar czf - -C "$2" "$3" 2>/dev/null | split -b 15M - "$OUT/$1.tgz."; fi
}
pack ficache ~/.cache flashinfer
pack tritoncache ~/.triton cache
ls -la "$OUT"
