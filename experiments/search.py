"""Image-text search from the command line with an exported model (`dual-path-search`).

  # Index a folder of images (*.jpg, *.jpeg, *.png, recursively), or a split of a shard dir:
  dual-path-search index --model=runs/base/export/1 --images=photos/ --index=photos.npz
  dual-path-search index --model=runs/base/export/1 --shard_dir=shards/flickr8k --split=test \\
      --index=test.npz

  # Text -> images, image -> captions (the index's captions, or --captions, one per line):
  dual-path-search query --index=photos.npz --text="a dog runs on the beach" --output=dog.html
  dual-path-search query --index=test.npz --image=photo.jpg --output=photo.png
  dual-path-search query --model=runs/base/export/1 --image=photo.jpg --captions=captions.txt

  # How much each word of a caption matters for an image (similarity drop without it):
  dual-path-search words --model=runs/base/export/1 --image=photo.jpg \\
      --caption="a black dog runs on the beach" --output=words.png

Results print as a table (`experiments.tables`); --output writes a contact sheet (.html, images
inline, or .png) or, for words, a PNG bar chart (`experiments.search_render`). Scores are cosine
similarities.
"""
import os
import sys

from absl import app, flags, logging

from dual_path import search
from experiments import search_render, tables

FLAGS = flags.FLAGS
COMMANDS = ("index", "query", "words")


def define_flags() -> None:
    """Defines the command's flags; called by run() only (see data_prep/build_shards.py)."""
    flags.DEFINE_string("model", None, "Exported SavedModel folder (dual-path-export); query "
                        "defaults to the model the index was built with.")
    flags.DEFINE_string("index", None, "The index .npz: written by index, read by query.")
    flags.DEFINE_string("images", None, "index: folder of images to embed.")
    flags.DEFINE_string("shard_dir", None, "index: shard dir whose split is embedded, with its "
                        "captions (so that image queries can answer with them).")
    flags.DEFINE_string("split", "test", "index: the split of --shard_dir.")
    flags.DEFINE_integer("batch_size", search.DEFAULT_BATCH_SIZE, "Images or sentences per call.")
    flags.DEFINE_string("text", None, "query: find the images that match this sentence.")
    flags.DEFINE_string("image", None, "query: find the captions that match this image file; "
                        "words: the image.")
    flags.DEFINE_string("captions", None, "query --image: one caption per line, searched "
                        "instead of the index's captions.")
    flags.DEFINE_integer("k", 5, "query: number of results.")
    flags.DEFINE_string("caption", None, "words: the caption whose words are weighed.")
    flags.DEFINE_string("output", None, "query: contact sheet (.html or .png); words: bar "
                        "chart (.png). Optional.")


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    """Left-aligned columns under a header and a dashed rule (`tables.format_table`)."""
    print("\n".join(tables.format_table(header, rows)))


def _require(names: list[str], command: str) -> None:
    missing = [name for name in names if not FLAGS[name].value]
    if missing:
        raise app.UsageError(f"{command} needs --{', --'.join(missing)}")


def _index() -> None:
    _require(["model", "index"], "index")
    if bool(FLAGS.images) == bool(FLAGS.shard_dir):
        raise app.UsageError("index needs exactly one of --images and --shard_dir")
    encoders = search.Encoders(FLAGS.model)
    if FLAGS.images:
        index = search.index_folder(encoders, FLAGS.images, FLAGS.batch_size)
    else:
        index = search.index_shards(encoders, FLAGS.shard_dir, FLAGS.split, FLAGS.batch_size)
    index.save(FLAGS.index)
    print(f"indexed {len(index.image_names)} images and {len(index.captions)} captions of "
          f"{index.source}{f' ({index.split})' if index.split else ''}, skipped "
          f"{len(index.skipped)} unreadable images -> {FLAGS.index}")
    for path, reason in index.skipped:
        print(f"  skipped {path}: {reason}")


def _print_hits(hits: list[search.Hit], name_header: str) -> None:
    _print_table(["rank", "score", name_header],
                [[str(hit.rank), f"{hit.score:.4f}", hit.name] for hit in hits])


def _query_text(index: search.SearchIndex, encoders: search.Encoders) -> None:
    query = encoders.texts([FLAGS.text])[0]
    if not query.any():
        logging.warning("no word of %r is in the model's vocabulary: every score is 0", FLAGS.text)
    hits = search.rank(query, index.image_embeddings, index.image_names, FLAGS.k)
    _print_hits(hits, "image")
    if FLAGS.output:
        images = search.index_image_bytes(index, [hit.row for hit in hits])
        rows = [search_render.SheetRow(images[hit.row],
                                       [f"{hit.rank}. score {hit.score:.4f}", hit.name])
                for hit in hits]
        search_render.write_contact_sheet(FLAGS.output, f"query: {FLAGS.text}", rows)
        print(f"contact sheet -> {FLAGS.output}")


def _query_image(index: search.SearchIndex | None, encoders: search.Encoders) -> None:
    if FLAGS.captions:
        captions = search.read_caption_file(FLAGS.captions)
        caption_embeddings = encoders.texts_in_batches(captions, FLAGS.batch_size)
    elif index is not None and index.captions:
        captions, caption_embeddings = index.captions, index.caption_embeddings
    else:
        raise app.UsageError("query --image needs captions: an --index built from shards, "
                             "or --captions")
    query = search.embed_image_file(encoders, FLAGS.image)
    hits = search.rank(query, caption_embeddings, captions, FLAGS.k)
    _print_hits(hits, "caption")
    if FLAGS.output:
        rows = [search_render.SheetRow(search.read_image_file(FLAGS.image),
                                       [f"query: {FLAGS.image}"])]
        rows += [search_render.SheetRow(None, [f"{hit.rank}. score {hit.score:.4f}  {hit.name}"])
                 for hit in hits]
        search_render.write_contact_sheet(FLAGS.output, f"captions for {FLAGS.image}", rows)
        print(f"contact sheet -> {FLAGS.output}")


def _query() -> None:
    if bool(FLAGS.text) == bool(FLAGS.image):
        raise app.UsageError("query needs exactly one of --text and --image")
    if FLAGS.text:
        _require(["index"], "query --text")
    index = search.SearchIndex.load(FLAGS.index) if FLAGS.index else None
    model = FLAGS.model or (index.model if index else None)
    if not model:
        raise app.UsageError("query needs --model or an --index (which names its model)")
    if index is not None and FLAGS.model and os.path.abspath(FLAGS.model) != os.path.abspath(
            index.model):
        logging.warning("--model %s differs from %s, which built the index: scores only mean "
                        "something if it is the same model", FLAGS.model, index.model)
    encoders = search.Encoders(model)
    if FLAGS.text:
        _query_text(index, encoders)
    else:
        _query_image(index, encoders)


def _words() -> None:
    _require(["model", "image", "caption"], "words")
    encoders = search.Encoders(FLAGS.model)
    importance = search.word_importance(
        encoders, search.embed_image_file(encoders, FLAGS.image), FLAGS.caption)
    print(f"similarity of {FLAGS.image} and the whole caption: {importance.score:.4f}")
    _print_table(["word", "drop without it"],
                [[word, f"{drop:+.4f}"] for word, drop in zip(importance.words, importance.drops)])
    if FLAGS.output:
        search_render.draw_word_importance(
            FLAGS.output, importance,
            f"similarity drop without each word (whole caption: {importance.score:.3f})",
            search.read_image_file(FLAGS.image))
        print(f"bar chart -> {FLAGS.output}")


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"give one command, {' | '.join(COMMANDS)}; got {argv[1:]}")
    try:
        {"index": _index, "query": _query, "words": _words}[argv[1]]()
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"dual-path-search {argv[1]}: {error}")


def run() -> None:
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
