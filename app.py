"""Search a photo folder in the browser by drawing, uploading a sketch or typing words:
python app.py path=<run> gallery=<folder> [port=7860]  (served on 127.0.0.1 only)"""

import hydra

from gallery.app import serve
from config.schema import register
from runtime.errors import run_cli

register()  # the typed schemas the config files build on


@hydra.main(version_base="1.3", config_path="setting", config_name="config-app")
def main(cfg):
    run_cli(serve, cfg)


if __name__ == "__main__":
    main()
