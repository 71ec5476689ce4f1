"""Help texts that several commands' options share."""

SET_HELP = "Override a recipe key, e.g. --set stages.sft.optimizer.lr=1e-5 (repeatable)."
OUTPUT_DIR_HELP = "Run directory (default: the recipe's output_dir)."
ADOPT_HELP = ("Write into a non-empty output folder llmlab did not create; llmlab still never deletes or "
              "overwrites the files already there.")
