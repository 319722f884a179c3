import sys

from amapo_train.study.run import main

if __name__ == "__main__":
    sys.exit(main())
