"""Write the GPTQ-style perplexity sets as one-line {"text"} jsonl: python prepare_eval_data.py [--out_dir .]
[--which wiki2 c4] [--wikitext_file wiki.test.raw | --wikitext_dir DIR] [--c4_file c4-validation...json.gz].
Without local files it loads them from the Hugging Face hub. Rerunning replaces the outputs."""
from utils.startup import imports_without_gc

with imports_without_gc():  # ~0.3-0.5 s less start-up (utils/startup.py)
    from utils.errors import cli
    from utils.eval_data import main as prepare_main


def main(argv=None):
    cli(lambda: prepare_main(argv))


if __name__ == "__main__":
    main()
