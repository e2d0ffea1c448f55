#!/usr/bin/env python3
"""Write the seed corpora of the dataset fuzz targets (Tests/Fuzz/corpus/{char,word,csv,sst,idx,cifar}).

An input is one flags byte (which hyperparameters the target uses: see Tests/Fuzz/FuzzTargets.swift)
followed by the dataset's files separated by b"\\n#####\\n". Seeds are small valid datasets, one per
interesting flags value, so mutations start from inputs that reach the batch code.
usage: python3 scripts/make_fuzz_corpora.py
"""
import gzip
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Tests", "Fuzz", "corpus")
SEP = b"\n#####\n"


def write(target, name, flags, *files):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(bytes([flags]) + SEP.join(files))


def idx(magic_type, dims, data):
    return struct.pack(">BBBB", 0, 0, magic_type, len(dims)) + b"".join(struct.pack(">I", n) for n in dims) + bytes(data)


def main():
    text = b"the quick brown fox jumps over the lazy dog and then the dog sleeps in the sun all day\n" * 2
    write("char", "text", 0, text)
    write("char", "text_streams", 4, text)
    write("char", "text8_compact", 2, text.replace(b"\n", b" "))
    dump = (
        b"<mediawiki><page><title>Fox</title><revision><text xml:space=\"preserve\">"
        b"The '''quick''' [[brown fox|fox]] jumps {{cite|x}} over 12 lazy dogs &amp; cats.\n"
        b"== History ==\n[[Category:Animals]] [http://example.org the lazy dog] sleeps in the sun all day long."
        b"</text></revision></page></mediawiki>\n"
    )
    write("char", "wikifil", 1, dump)
    write("char", "wikifil_compact_streams", 7, dump)

    train = b" = Title = \n the cat sat on the mat . \n the dog sat on the log . \n the cat ran . \n"
    valid = b" the dog ran on the mat . \n"
    test = b" the cat sat . \n <unk> ran . \n"
    write("word", "dir", 0, train, valid, test)
    write("word", "dir_min_count_max_vocab_streams", 14, train, valid, test)
    write("word", "path", 1, train * 3)

    csv = (
        b'text,category\nI am still waiting on my card?,card_arrival\n"My card, is it lost?",lost_card\n'
        b'"She said ""hi"" to me",card_arrival\nWhere is my money,top_up\nhow do I top up,top_up\n'
        b"card never came,card_arrival\n"
    )
    test_csv = b'text,category\ncard not here,card_arrival\n"top up, please",top_up\nlost it,lost_card\n'
    categories = b'["card_arrival", "lost_card", "top_up"]'
    write("csv", "with_categories", 0, csv, test_csv, categories)
    write("csv", "train_labels_tail", 9, csv, test_csv)
    tsv = csv.replace(b",", b"\t").replace(b'"My card\t is it lost?"', b"My card is it lost?")
    write("csv", "tsv_auto", 16, tsv, test_csv, categories)

    sst_train = b"1 a stirring , funny and finally transporting film\n0 apparently reassembled from the floor .\n1 good\n"
    sst_dev = b"0 they presume their audience wo n't sit still .\n1 fine\n"
    sst_test = b"1 worth it .\n0 not worth it .\n"
    write("sst", "binary", 0, sst_train, sst_dev, sst_test)
    fine = sst_train.replace(b"1 a", b"4 a").replace(b"1 good", b"3 good")
    write("sst", "fine", 1, fine, sst_dev.replace(b"0 they", b"2 they"), sst_test)

    images = idx(0x08, [8, 3, 3], range(72))
    labels = idx(0x08, [8], [i % 3 for i in range(8)])
    t_images = idx(0x08, [3, 3, 3], range(100, 127))
    t_labels = idx(0x08, [3], [2, 1, 0])
    write("idx", "plain", 2, images, labels, t_images, t_labels)
    write("idx", "gzip_normalized", 3, gzip.compress(images, mtime=0), gzip.compress(labels, mtime=0),
          gzip.compress(t_images, mtime=0), t_labels)
    write("idx", "ten_classes_half_valid", 4, images, idx(0x08, [8], [i for i in range(8)]), t_images, t_labels)

    def cifar100(n, start):
        # Record: coarse label byte, fine label byte, 3·32·32 pixel bytes (R, G, B planes).
        return b"".join(bytes([i % 20, (i * 7) % 100]) + bytes((start + i + j) % 256 for j in range(3072))
                        for i in range(n))
    write("cifar", "fine", 0, cifar100(4, 0), cifar100(2, 50))
    write("cifar", "coarse", 1, cifar100(4, 9), cifar100(1, 3))


if __name__ == "__main__":
    main()
