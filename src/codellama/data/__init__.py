"""Training-corpus pipeline (spec 4.2, 4.3): sources -> filters -> dedup -> decontamination -> FIM ->
tokenised shards. One module per job:

- sources.py   stream documents from folders, git repositories, installed packages, jsonl files
- filters.py   drop binary/invalid UTF-8, huge, long-line, low-alphanumeric and auto-generated files
- dedup.py     exact (hash) and near (MinHash LSH) deduplication, streaming
- decontam.py  n-gram overlap against HumanEval, MBPP, MultiPL-E
- fim.py       the paper's fill-in-the-middle transform (PSM/SPM, document level)
- pack.py      tokenise documents (optionally on several processes)
- packer.py    place each split's documents in its token stream so that no training window cuts a FIM example
- shards.py    the on-disk format: ShardWriter and the reader TokenShards the trainer consumes
- pipeline.py  wires the above together for `codellama data` and the benchmark
"""

from codellama.data.shards import TokenShards  # noqa: E402  (the trainer's entry point)

__all__ = ["TokenShards"]
