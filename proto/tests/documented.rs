//! Every service, method, message, field, enum and enum value of the published API has a
//! comment: the `.proto` is the reference a control-plane author reads (and what
//! `grpcurl describe` shows).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;

use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorProto};

// Field numbers in descriptor.proto, the keys of SourceCodeInfo paths.
const FILE_MESSAGE: i32 = 4;
const FILE_ENUM: i32 = 5;
const FILE_SERVICE: i32 = 6;
const MESSAGE_FIELD: i32 = 2;
const MESSAGE_NESTED: i32 = 3;
const MESSAGE_ENUM: i32 = 4;
const MESSAGE_ONEOF: i32 = 8;
const ENUM_VALUE: i32 = 2;
const SERVICE_METHOD: i32 = 2;

struct Walk<'a> {
    comments: HashMap<Vec<i32>, &'a str>,
    missing: Vec<String>,
}

impl Walk<'_> {
    fn need(&mut self, path: &[i32], what: String) {
        if self.comments.get(path).is_none_or(|c| c.trim().is_empty()) {
            self.missing.push(what);
        }
    }

    fn message(&mut self, path: Vec<i32>, m: &DescriptorProto, scope: &str) {
        let name = format!("{scope}.{}", m.name());
        self.need(&path, format!("message {name}"));
        for (i, f) in m.field.iter().enumerate() {
            let p = [path.clone(), vec![MESSAGE_FIELD, i as i32]].concat();
            self.need(&p, format!("field {name}.{}", f.name()));
        }
        for (i, o) in m.oneof_decl.iter().enumerate() {
            // The synthetic oneof of a proto3 `optional` field has no source of its own.
            if o.name().starts_with('_') {
                continue;
            }
            let p = [path.clone(), vec![MESSAGE_ONEOF, i as i32]].concat();
            self.need(&p, format!("oneof {name}.{}", o.name()));
        }
        for (i, n) in m.nested_type.iter().enumerate() {
            if n.options.as_ref().is_some_and(|o| o.map_entry()) {
                continue;
            }
            self.message(
                [path.clone(), vec![MESSAGE_NESTED, i as i32]].concat(),
                n,
                &name,
            );
        }
        for (i, e) in m.enum_type.iter().enumerate() {
            self.enumeration(
                [path.clone(), vec![MESSAGE_ENUM, i as i32]].concat(),
                e,
                &name,
            );
        }
    }

    fn enumeration(&mut self, path: Vec<i32>, e: &EnumDescriptorProto, scope: &str) {
        let name = format!("{scope}.{}", e.name());
        self.need(&path, format!("enum {name}"));
        for (i, v) in e.value.iter().enumerate() {
            let p = [path.clone(), vec![ENUM_VALUE, i as i32]].concat();
            self.need(&p, format!("enum value {name}.{}", v.name()));
        }
    }
}

fn api() -> FileDescriptorProto {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let set = protox::compile([root.join("quantixkvm/agent/v1/agent.proto")], [&root]).unwrap();
    set.file
        .into_iter()
        .find(|f| f.name() == "quantixkvm/agent/v1/agent.proto")
        .unwrap()
}

fn undocumented(file: &FileDescriptorProto) -> Vec<String> {
    let info = file.source_code_info.as_ref().expect("source info");
    let comments = info
        .location
        .iter()
        .filter_map(|l| {
            let c = l
                .leading_comments
                .as_deref()
                .or(l.trailing_comments.as_deref())?;
            Some((l.path.clone(), c))
        })
        .collect();
    let mut w = Walk {
        comments,
        missing: Vec::new(),
    };
    let pkg = file.package();
    for (i, m) in file.message_type.iter().enumerate() {
        w.message(vec![FILE_MESSAGE, i as i32], m, pkg);
    }
    for (i, e) in file.enum_type.iter().enumerate() {
        w.enumeration(vec![FILE_ENUM, i as i32], e, pkg);
    }
    for (i, s) in file.service.iter().enumerate() {
        let name = format!("{pkg}.{}", s.name());
        w.need(&[FILE_SERVICE, i as i32], format!("service {name}"));
        for (j, m) in s.method.iter().enumerate() {
            w.need(
                &[FILE_SERVICE, i as i32, SERVICE_METHOD, j as i32],
                format!("rpc {name}.{}", m.name()),
            );
        }
    }
    w.missing
}

#[test]
fn every_element_of_the_api_has_a_comment() {
    let missing = undocumented(&api());
    assert!(
        missing.is_empty(),
        "{} undocumented:\n  {}",
        missing.len(),
        missing.join("\n  ")
    );
}

#[test]
fn the_check_finds_an_undocumented_field() {
    let mut file = api();
    let info = file.source_code_info.as_mut().unwrap();
    // Drop the comment of the first message's first field.
    for l in &mut info.location {
        if l.path == [FILE_MESSAGE, 0, MESSAGE_FIELD, 0] {
            l.leading_comments = None;
            l.trailing_comments = None;
        }
    }
    let missing = undocumented(&file);
    assert_eq!(missing.len(), 1, "{missing:?}");
    assert!(
        missing[0].starts_with("field quantixkvm.agent.v1."),
        "{missing:?}"
    );
}
