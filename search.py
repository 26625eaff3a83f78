"""Search a photo folder with a sketch, a photo or words:
python search.py path=<run> gallery=<folder> query=<image file> | text="a bicycle" [k=10]"""
import hydra

from gallery.search import search
from runtime.errors import run_cli


@hydra.main(version_base="1.3", config_path="setting", config_name="config-search")
def main(cfg):
    run_cli(search, cfg)


if __name__ == "__main__":
    main()
