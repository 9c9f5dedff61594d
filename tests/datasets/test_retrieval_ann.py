"""Retrieval annotation readers (datasets/retrieval.py) on small files in the public layouts written here: caption
grouping, splits, txt2media / media2txt / media_ids, junk skipped and counted by reason, one-line ValueErrors."""
import json
import os

import pytest

from datasets.retrieval import RetrievalSet, read_retrieval


def touch(root, *rels):
    for rel in rels:
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(b"x")


def dump(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def captions_by_media(rs: RetrievalSet, root) -> dict:
    return {os.path.relpath(m, root): [rs.texts[t] for t in ts] for m, ts in zip(rs.media, rs.media2txt)}


def one_line_error(match, *args, **kw):
    with pytest.raises(ValueError, match=match) as e:
        read_retrieval(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


# ------------------------------------------------------------------------------------------------------- albef
def test_albef_train_groups_repeated_images_and_counts_junk(tmp_path):
    root = tmp_path / "coco"
    touch(root, "train2014/a.jpg", "train2014/b.jpg", "val2014/c.jpg", "val2014/c2.jpg")
    ann = dump(tmp_path / "coco_train.json", [
        {"caption": "A dog runs. ", "image": "train2014/a.jpg", "image_id": "coco_1"},
        {"caption": "a cat", "image": "train2014/b.jpg", "image_id": "coco_2"},
        {"caption": "a  dog\tplaying", "image": "train2014/a.jpg", "image_id": "coco_1"},
        {"caption": "   ", "image": "train2014/a.jpg", "image_id": "coco_1"},          # empty_caption
        {"caption": 7, "image": "train2014/b.jpg", "image_id": "coco_2"},              # bad_caption
        {"image": "train2014/b.jpg", "image_id": "coco_2"},                            # missing_caption
        ["not", "a", "dict"],                                                          # bad_entry
        {"caption": "no image"},                                                       # missing_field
        {"caption": "bad path", "image": 12},                                          # bad_field
        {"caption": "a gone bird", "image": "train2014/gone.jpg", "image_id": "coco_9"},   # missing_media
        {"caption": "", "image": "train2014/gone2.jpg"},                               # empty_caption, no_caption
        {"caption": "a copy of c", "image": "val2014/c2.jpg", "image_id": "coco_3"},
        {"caption": "c itself", "image": "val2014/c.jpg", "image_id": "coco_3"},       # same id, other path
    ])
    rs = read_retrieval("albef", ann, str(root), None, "image")
    assert rs.modality == "image"
    assert all(os.path.isabs(m) for m in rs.media)
    assert captions_by_media(rs, root) == {
        "train2014/a.jpg": ["A dog runs.", "a dog playing"], "train2014/b.jpg": ["a cat"],
        "val2014/c2.jpg": ["a copy of c"], "val2014/c.jpg": ["c itself"]}
    assert rs.txt2media == [0, 0, 1, 2, 3]
    assert rs.media2txt == [[0, 1], [2], [3], [4]]
    assert rs.pairs() == [(0, 0), (0, 1), (1, 2), (2, 3), (3, 4)]
    assert rs.media_ids == [0, 1, 2, 2]      # c and c2 share image_id coco_3: one picture for ITC positives
    assert rs.skipped == {"bad_entry": 1, "missing_field": 1, "bad_field": 1, "missing_caption": 1,
                          "bad_caption": 1, "empty_caption": 2, "no_caption": 1, "missing_media": 1}


def test_albef_test_caption_lists_and_several_files(tmp_path):
    root = tmp_path / "f30k"
    touch(root, "flickr30k-images/1.jpg", "flickr30k-images/2.jpg")
    a = dump(tmp_path / "part1.json", [{"image": "flickr30k-images/1.jpg", "caption": ["one", "", "uno", None]}])
    b = dump(tmp_path / "part2.json", [{"image": "flickr30k-images/2.jpg", "caption": ["two"]},
                                       {"image": "flickr30k-images/1.jpg", "caption": []}])   # missing_caption
    rs = read_retrieval("albef", [a, b], str(root))
    assert rs.modality == "image"                                           # the format's default
    assert captions_by_media(rs, root) == {"flickr30k-images/1.jpg": ["one", "uno"],
                                           "flickr30k-images/2.jpg": ["two"]}
    assert rs.txt2media == [0, 0, 1] and rs.media_ids == [0, 1]
    assert rs.skipped == {"missing_caption": 1, "bad_caption": 1, "empty_caption": 1}


# ---------------------------------------------------------------------------------------------------- karpathy
def karpathy_coco(tmp_path):
    root = tmp_path / "images"
    touch(root, "train2014/COCO_train2014_000000000011.jpg", "val2014/COCO_val2014_000000000022.jpg",
          "val2014/COCO_val2014_000000000033.jpg", "val2014/COCO_val2014_000000000044.jpg")
    imgs = [
        {"filepath": "val2014", "filename": "COCO_val2014_000000000033.jpg", "imgid": 0, "cocoid": 33, "split": "test",
         "sentences": [{"raw": "Test one. ", "tokens": ["test", "one"]}, {"raw": "Test two."}]},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000011.jpg", "imgid": 1, "cocoid": 11,
         "split": "train", "sentences": [{"raw": "Train a."}, {"raw": ""}, {"tokens": []}, "junk"]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000022.jpg", "imgid": 2, "cocoid": 22,
         "split": "restval", "sentences": [{"raw": "Restval a."}, {"raw": 5}]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000044.jpg", "imgid": 3, "cocoid": 44, "split": "val",
         "sentences": [{"raw": "Val a."}]},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000099.jpg", "imgid": 4, "cocoid": 99,
         "split": "train", "sentences": [{"raw": "Not on disk."}]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000098.jpg", "imgid": 5, "cocoid": 98, "split": "test",
         "sentences": [{"raw": "Test image not on disk."}]},
        {"filename": "x.jpg", "sentences": [{"raw": "no split"}]},
        "not an image",
    ]
    return dump(tmp_path / "dataset_coco.json", {"images": imgs, "dataset": "coco"}), root


def test_karpathy_splits_select_images_and_count_only_their_junk(tmp_path):
    ann, root = karpathy_coco(tmp_path)
    train = read_retrieval("karpathy", [ann], str(root), ["train", "restval"], "image")
    assert captions_by_media(train, root) == {"train2014/COCO_train2014_000000000011.jpg": ["Train a."],
                                              "val2014/COCO_val2014_000000000022.jpg": ["Restval a."]}
    assert train.txt2media == [0, 1] and train.media_ids == [0, 1]
    assert train.skipped == {"bad_entry": 2, "missing_field": 1, "missing_caption": 1, "bad_caption": 1,
                             "empty_caption": 1, "missing_media": 1}
    test = read_retrieval("karpathy", ann, str(root), "test")
    assert captions_by_media(test, root) == {"val2014/COCO_val2014_000000000033.jpg": ["Test one.", "Test two."]}
    assert test.skipped == {"bad_entry": 1, "missing_field": 1, "missing_media": 1}
    everything = read_retrieval("karpathy", ann, str(root), None)
    assert len(everything.media) == 4          # x.jpg (no split) is read too when not selecting by split
    assert everything.skipped == {"bad_entry": 2, "missing_caption": 1, "bad_caption": 1, "empty_caption": 1,
                                  "missing_media": 3}


def test_karpathy_flickr_has_no_filepath(tmp_path):
    root = tmp_path / "flickr30k-images"
    touch(root, "100.jpg", "200.jpg")
    ann = dump(tmp_path / "dataset_flickr30k.json", {"images": [
        {"filename": "100.jpg", "imgid": 0, "split": "test", "sentences": [{"raw": "a"}, {"raw": "b"}]},
        {"filename": "200.jpg", "imgid": 1, "split": "train", "sentences": [{"raw": "c"}]},
        {"filename": "300.jpg", "imgid": 2, "split": "val", "sentences": [{"raw": "d"}]}], "dataset": "flickr30k"})
    rs = read_retrieval("karpathy", ann, str(root), ["test"])
    assert rs.media == [str(root / "100.jpg")] and rs.texts == ["a", "b"] and rs.skipped == {}


def test_karpathy_unknown_split_name(tmp_path):
    ann, root = karpathy_coco(tmp_path)
    one_line_error("'testt' is not one of train, restval, val, test", "karpathy", ann, str(root), ["testt"])


# ------------------------------------------------------------------------------------------------------ msrvtt
def msrvtt_files(tmp_path):
    root = tmp_path / "videos"
    touch(root, *(f"video{i}.mp4" for i in (0, 1, 2, 7010, 7011)))
    data = dump(tmp_path / "MSRVTT_data.json", {
        "info": {}, "videos": [{"video_id": f"video{i}", "split": s, "id": i}
                               for i, s in ((0, "train"), (1, "train"), (2, "validate"), (3, "train"),
                                            (7010, "test"), (7011, "test"))],
        "sentences": [{"caption": "zero a", "video_id": "video0", "sen_id": 0},
                      {"caption": "one a", "video_id": "video1", "sen_id": 1},
                      {"caption": "", "video_id": "video0", "sen_id": 2},
                      {"caption": "zero b", "video_id": "video0", "sen_id": 3},
                      {"caption": "test a", "video_id": "video7010", "sen_id": 4},
                      {"caption": "three a", "video_id": "video3", "sen_id": 5},
                      {"video_id": "video1", "sen_id": 6},
                      {"caption": "two a", "video_id": "video2", "sen_id": 7}]})
    train_csv = write(tmp_path / "MSRVTT_train.9k.csv", "video_id\nvideo1\nvideo0\nvideo3\nvideo5\n")
    test_csv = write(tmp_path / "MSRVTT_JSFUSION_test.csv",
                     "key,vid_key,video_id,sentence\n"
                     "ret0,msr7011,video7011,a man, then a dog\n"
                     'ret1,msr7010,video7010,"quoted, fine"\n'
                     "ret2,msr7012,video7012,not on disk\n"
                     "ret3,msr7013,video7013\n"
                     "ret4,msr7014,,no id\n")
    return data, train_csv, test_csv, root


def test_msrvtt_train_is_the_json_captions_of_the_listed_videos(tmp_path):
    data, train_csv, _, root = msrvtt_files(tmp_path)
    rs = read_retrieval("msrvtt", [data, train_csv], str(root), None, "video")
    assert rs.modality == "video"
    assert captions_by_media(rs, root) == {"video1.mp4": ["one a"], "video0.mp4": ["zero a", "zero b"]}  # csv order
    assert rs.txt2media == [0, 1, 1] and rs.media_ids == [0, 1]
    # video3: listed, captioned, no mp4; video5: listed, no sentence; video2 / video7010: not listed (not counted)
    assert rs.skipped == {"missing_caption": 1, "empty_caption": 1, "no_caption": 1, "missing_media": 1}
    same = read_retrieval("msrvtt", [train_csv, data], str(root))      # either order
    assert (same.media, same.texts) == (rs.media, rs.texts)


def test_msrvtt_jsfusion_test_csv(tmp_path):
    _, _, test_csv, root = msrvtt_files(tmp_path)
    rs = read_retrieval("msrvtt", [test_csv], str(root))
    assert captions_by_media(rs, root) == {"video7011.mp4": ["a man, then a dog"], "video7010.mp4": ["quoted, fine"]}
    assert rs.skipped == {"missing_field": 1, "bad_row": 1, "missing_media": 1}


def test_msrvtt_json_alone_selects_by_the_videos_split(tmp_path):
    data, _, _, root = msrvtt_files(tmp_path)
    rs = read_retrieval("msrvtt", data, str(root), ["train", "validate"])
    assert captions_by_media(rs, root) == {"video0.mp4": ["zero a", "zero b"], "video1.mp4": ["one a"],
                                           "video2.mp4": ["two a"]}
    assert rs.skipped == {"missing_caption": 1, "empty_caption": 1, "missing_media": 1}


def test_msrvtt_wrong_combinations(tmp_path):
    data, train_csv, test_csv, root = msrvtt_files(tmp_path)
    one_line_error("without captions", "msrvtt", [train_csv], str(root))
    one_line_error("has its own captions", "msrvtt", [data, test_csv], str(root))
    other = write(tmp_path / "ids.csv", "vid\nvideo0\n")
    msg = one_line_error("expected a 'video_id' column", "msrvtt", [data, other], str(root))
    assert msg.startswith(other)
    one_line_error("image", "msrvtt", [test_csv], str(root), None, "image")


# ------------------------------------------------------------------------------------------------------- lsmdc
def test_lsmdc_tab_rows_flat_and_nested_clips(tmp_path):
    root = tmp_path / "lsmdc"
    c1 = "0001_American_Beauty_00.00.51.926-00.00.54.129"
    c2 = "1004_Juno_00.00.32.849-00.00.38.839"
    c3 = "1004_Juno_00.01.00.000-00.01.02.000"
    touch(root, f"{c1}.mp4", f"1004_Juno/{c2}.avi")
    t = "00.00.51.926\t00.00.54.129\t00.00.51.926\t00.00.54.129"
    ann = write(tmp_path / "LSMDC16_annos_training.csv",
                f"{c1}\t{t}\tSOMEONE looks up.\n"
                f"{c2}\t{t}\tSOMEONE, smiling, \"waves\".\n"
                f"{c1}\t{t}\tHe sits.\r\n"
                f"{c1}\t{t}\t   \n"
                f"{c2}\t{t}\n"
                f"\n"
                f"{c3}\t{t}\tNot on disk.\n")
    rs = read_retrieval("lsmdc", ann, str(root))
    assert rs.modality == "video"
    assert captions_by_media(rs, root) == {f"{c1}.mp4": ["SOMEONE looks up.", "He sits."],
                                           f"1004_Juno/{c2}.avi": ['SOMEONE, smiling, "waves".']}
    assert rs.txt2media == [0, 0, 1]           # texts grouped by media, media in order of first appearance
    assert rs.skipped == {"empty_caption": 1, "bad_row": 1, "missing_media": 1}


def test_lsmdc_comma_file_is_not_the_layout(tmp_path):
    ann = write(tmp_path / "x.csv", "clip,start,end,sentence\na,1,2,hello\n")
    msg = one_line_error("not an LSMDC annotation file", "lsmdc", ann, str(tmp_path))
    assert msg.startswith(ann + ": ")
    one_line_error("no split field", "lsmdc", ann, str(tmp_path), ["test"])


# ------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("fmt,content,match", [
    ("albef", {"images": []}, "expected a JSON list .* got a JSON object"),
    ("karpathy", [{"filename": "a.jpg"}], "not a Karpathy split file .* got a JSON list"),
    ("karpathy", {"annotations": []}, r"not a Karpathy split file .*got keys \['annotations'\]"),
    ("msrvtt", ["video0"], "not an MSRVTT data file"),
])
def test_wrong_layout_names_the_file(tmp_path, fmt, content, match):
    ann = dump(tmp_path / "ann.json", content)
    msg = one_line_error(match, fmt, [ann], str(tmp_path))
    assert msg.startswith(ann + ": ")


def test_unreadable_and_missing_files(tmp_path):
    bad = write(tmp_path / "bad.json", '[{"image": "a.jpg",\n "caption": ')
    msg = one_line_error("not a JSON file", "albef", bad, str(tmp_path))
    assert msg.startswith(bad + ": ")
    gone = str(tmp_path / "gone.json")
    assert one_line_error("cannot read", "karpathy", gone, str(tmp_path)).startswith(gone + ": ")
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00[")
    one_line_error("not UTF-8", "albef", str(binary), str(tmp_path))


def test_unknown_format_and_bad_arguments(tmp_path):
    one_line_error("unknown retrieval annotation format 'coco'; known: albef, karpathy, lsmdc, msrvtt",
                   "coco", "x.json", str(tmp_path))
    one_line_error("modality must be one of image, video", "albef", "x.json", str(tmp_path), None, "audio")
    one_line_error("no split field", "albef", "x.json", str(tmp_path), "train")
    one_line_error("non-empty list of paths", "albef", [], str(tmp_path))
