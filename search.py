"""Search a photo folder with a sketch, a photo or words:
python search.py path=<run> gallery=<folder> query=<image file> | text="a bicycle" [k=10]"""

import hydra

from gallery.search import search
from config.schema import register
from runtime.errors import run_cli

register()  # the typed schemas the config files build on


@hydra.main(version_base="1.3", config_path="setting", config_name="config-search")
def main(cfg):
    run_cli(search, cfg)


if __name__ == "__main__":
    main()
