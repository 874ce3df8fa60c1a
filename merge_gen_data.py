"""Merge the generated shards into one training file: python merge_gen_data.py [--gen_dir gen_data]
[--out gen_data/all_gen.jsonl] [--shuffle --seed S] [--dedup] [--skip_bad]. Rerunning replaces the output."""
from utils.startup import imports_without_gc

with imports_without_gc():  # ~0.3-0.5 s less start-up (utils/startup.py)
    from utils.errors import cli
    from utils.merge import main as merge_main


def main(argv=None):
    cli(lambda: merge_main(argv))


if __name__ == "__main__":
    main()
