//! Corpus reading: formats, document splitting, and the errors for bad files.

use std::fs;
use std::path::{Path, PathBuf};

use ferry_dataset::corpus::{expand_inputs, read_documents, Document};
use ferry_dataset::DataError;

fn write(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, contents).unwrap();
    path
}

/// The error's message is one line that starts with the file's path.
fn assert_names(err: &DataError, path: &Path) {
    let message = err.to_string();
    assert!(
        message.starts_with(&path.display().to_string()),
        "{message:?} does not start with {path:?}"
    );
    assert!(!message.contains('\n'), "{message:?} is not one line");
}

const WIKI: &str = " \n = Valkyria Chronicles = \n \n Senjō no Valkyria is a game . It was made in 2011 ? Yes ! \n \
                    \n = = Gameplay = = \n \n The game costs 1 @.@ 5 dollars in the U.S. and more . \n \
                    \n = = = Plot = = = \n \n Text here . \n \n = Tropical Storm = \n \n A storm formed . \n";

#[test]
fn wikitext_splits_articles_at_titles_not_headings() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "wiki.valid.tokens", WIKI);
    let docs = read_documents(&path).unwrap();
    assert_eq!(docs.len(), 2, "{docs:#?}");
    assert_eq!(docs[0].source, "wiki.valid.tokens");
    assert_eq!(docs[0].title.as_deref(), Some("Valkyria Chronicles"));
    assert_eq!(
        docs[0].lines,
        [
            "= Valkyria Chronicles =",
            "Senjō no Valkyria is a game .",
            "It was made in 2011 ?",
            "Yes !",
            "= = Gameplay = =",
            "The game costs 1 @.@ 5 dollars in the U.S. and more .",
            "= = = Plot = = =",
            "Text here .",
        ]
    );
    assert_eq!(docs[1].title.as_deref(), Some("Tropical Storm"));
    assert_eq!(docs[1].lines, ["= Tropical Storm =", "A storm formed ."]);
}

#[test]
fn wikitext_detected_by_content_and_leading_text_is_untitled() {
    let dir = tempfile::tempdir().unwrap();
    // A title on the first non-blank line makes a .txt file WikiText.
    let path = write(dir.path(), "articles.txt", WIKI);
    assert_eq!(read_documents(&path).unwrap().len(), 2);
    // By name, text before the first title is a document of its own.
    let path = write(
        dir.path(),
        "x.raw",
        "Intro text . More .\n = A = \n Body .\n",
    );
    let docs = read_documents(&path).unwrap();
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[0].title, None);
    assert_eq!(docs[0].lines, ["Intro text .", "More ."]);
    assert_eq!(docs[1].lines, ["= A =", "Body ."]);
}

fn book_docs(text: &str) -> Vec<Document> {
    let dir = tempfile::tempdir().unwrap();
    read_documents(&write(dir.path(), "book.txt", text)).unwrap()
}

#[test]
fn book_header_is_the_title_and_chapters_start_documents() {
    let docs = book_docs(
        "[ Alice by Lewis Carroll 1865 ]\nCHAPTER I. Down\nAlice sat .\n\n  She was bored .  \nCHAPTER II\nTears .\n",
    );
    assert_eq!(docs.len(), 2);
    for doc in &docs {
        assert_eq!(doc.title.as_deref(), Some("Alice by Lewis Carroll 1865"));
        assert_eq!(doc.source, "book.txt");
    }
    assert_eq!(
        docs[0].lines,
        ["CHAPTER I. Down", "Alice sat .", "She was bored ."]
    );
    assert_eq!(docs[1].lines, ["CHAPTER II", "Tears ."]);
}

#[test]
fn book_text_on_the_header_line_is_kept() {
    let docs =
        book_docs("[ Paradise Lost by John Milton 1667 ] Book I Of Man 's first .\nNext .\n");
    assert_eq!(docs.len(), 1);
    assert_eq!(
        docs[0].title.as_deref(),
        Some("Paradise Lost by John Milton 1667")
    );
    assert_eq!(docs[0].lines, ["Book I Of Man 's first .", "Next ."]);
}

#[test]
fn long_books_are_cut_every_200_lines() {
    let text: String = (0..450).map(|i| format!("Sentence {i} .\n")).collect();
    let docs = book_docs(&text);
    let sizes: Vec<usize> = docs.iter().map(|d| d.lines.len()).collect();
    assert_eq!(sizes, [200, 200, 50]);
    assert_eq!(docs[0].title, None);
    assert_eq!(docs[2].lines[0], "Sentence 400 .");
}

#[test]
fn bom_and_crlf_are_handled() {
    let docs = book_docs("\u{feff}[ T ]\r\nOne .\r\nTwo .\r\n");
    assert_eq!(docs[0].title.as_deref(), Some("T"));
    assert_eq!(docs[0].lines, ["One .", "Two ."]);
}

#[test]
fn empty_files_are_empty_corpora() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("empty.txt", ""),
        ("blank.txt", " \n\r\n\t\n"),
        ("header-only.txt", "[ Title ]\n"),
        ("empty.tokens", "\n \n"),
    ] {
        let path = write(dir.path(), name, text);
        let err = read_documents(&path).unwrap_err();
        assert!(
            matches!(err, DataError::EmptyCorpus { .. }),
            "{name}: {err:?}"
        );
        assert_names(&err, &path);
    }
}

#[test]
fn binary_file_is_rejected_with_the_offset() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "model.bin", b"abc\n\x00\x01\x02");
    let err = read_documents(&path).unwrap_err();
    assert!(
        matches!(err, DataError::Binary { offset: 4, .. }),
        "{err:?}"
    );
    assert_names(&err, &path);
    assert!(err.to_string().contains("NUL byte at offset 4"), "{err}");
}

#[test]
fn invalid_utf8_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "latin1.txt", b"ok\nfine \xc3\xa9\ncaf\xe9 .\n");
    let err = read_documents(&path).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::InvalidUtf8 {
                line: 3,
                byte_offset: 14,
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, &path);
    assert!(err.to_string().contains("line 3"), "{err}");
}

#[test]
fn missing_file_is_an_io_error() {
    let path = Path::new("/nonexistent/ferry/corpus.txt");
    let err = read_documents(path).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }), "{err:?}");
    assert_names(&err, path);
}

#[test]
fn expand_inputs_lists_directories_and_globs() {
    let dir = tempfile::tempdir().unwrap();
    let b = write(dir.path(), "b.txt", "b");
    let a = write(dir.path(), "a.txt", "a");
    let c = write(dir.path(), "c.tokens", "c");
    write(dir.path(), ".hidden.txt", "h");
    fs::create_dir(dir.path().join("sub")).unwrap();
    write(&dir.path().join("sub"), "nested.txt", "n");
    let root = dir.path().display().to_string();

    // Directories: visible files only, not recursive, sorted.
    let found = expand_inputs(std::slice::from_ref(&root)).unwrap();
    assert_eq!(found, [a.clone(), b.clone(), c.clone()]);
    // Globs, plus a file named twice: sorted and deduplicated.
    let found = expand_inputs(&[format!("{root}/*.txt"), c.display().to_string(), root]).unwrap();
    assert_eq!(found, [a, b, c]);
}

#[test]
fn patterns_matching_nothing_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.txt", "a");
    fs::create_dir(dir.path().join("empty")).unwrap();
    for pattern in [
        format!("{}/*.json", dir.path().display()),
        format!("{}/missing.txt", dir.path().display()),
        format!("{}/empty", dir.path().display()),
    ] {
        let err = expand_inputs(std::slice::from_ref(&pattern)).unwrap_err();
        assert!(matches!(err, DataError::NoInputs { .. }), "{err:?}");
        assert!(err.to_string().starts_with(&pattern), "{err}");
    }
}
