"""erm's data: the readers of preference pairs and scoring records (`erm.data.readers`), and the
built-in files next to this module (``pairs.jsonl``, the sample `erm eval` reads by default;
``arithmetic.jsonl``, the RL prompts of `erm.tasks`; ``best_of_n.jsonl`` and
``rmbench_demo.jsonl``, the demonstration files of `erm.best_of_n` and `erm.rmbench`, which
`erm eval --sample best-of-n` / `--sample rmbench` reads).

    from erm.data import load_pairs, load_records
    pairs = load_pairs("pairs.jsonl")
"""
from .readers import (DEFAULT_SUBSET, DataError, Messages, Pair, Prompt, check_record,
                      default_data_path, is_parquet, json_lines, load_pairs, load_records,
                      parse_record, parse_records, read_lines, read_records, record_prompt)

__all__ = ["DEFAULT_SUBSET", "DataError", "Messages", "Pair", "Prompt", "check_record",
           "default_data_path", "is_parquet", "json_lines", "load_pairs", "load_records",
           "parse_record", "parse_records", "read_lines", "read_records", "record_prompt"]
