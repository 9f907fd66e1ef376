//! What changed between two versions of a Terraform state, as a JSON summary: outputs and
//! resource instances added, removed and changed, by address. A pure function (no I/O): the
//! caller fetches (and opens) both versions. Values of sensitive outputs never reach the answer.
//!
//! The answer:
//! ```json
//! {"from": {"serial": 3, "lineage": "…"}, "to": {"serial": 4, "lineage": "…"},
//!  "outputs": {"added":   [{"name": "ip", "sensitive": false, "value": "10.0.0.1"}],
//!              "removed": [{"name": "old", "sensitive": false}],
//!              "changed": [{"name": "id", "sensitive": false, "from": "a", "to": "b"},
//!                          {"name": "password", "sensitive": true}]},
//!  "resources": {"added": ["aws_instance.web[0]", "module.vpc.aws_subnet.a[\"x\"]"],
//!                "removed": ["data.aws_ami.ubuntu"], "changed": ["aws_instance.web[1]"]}}
//! ```
//! Outputs are sorted by name; resource addresses by module, mode, type, name and instance key
//! (numbers in numeric order, so `web[2]` comes before `web[10]`).

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{json, Map, Value};

/// Which of the two versions a [`DiffError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    From,
    To,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::From => "from",
            Side::To => "to",
        })
    }
}

/// Why two versions cannot be compared. Messages name the side and the field, never a value
/// of the state, so they can go into a 400/422 body as they are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiffError {
    /// The version holds no bytes at all (as a deleted state does).
    #[error("the `{side}` version is empty (a deleted state?); there is no state to compare")]
    Empty { side: Side },
    /// The version is not JSON. `reason` is the parser's complaint (a position, no content).
    #[error("the `{side}` version is not JSON: {reason}")]
    NotJson { side: Side, reason: String },
    /// JSON, but not a Terraform state: `reason` names the missing or mistyped field.
    #[error("the `{side}` version is not a Terraform state: {reason}")]
    NotAState { side: Side, reason: String },
    /// A Terraform state of a format other than 4 (Terraform 0.11 and older wrote 3).
    #[error("the `{side}` version is a state of format version {version}; only format version 4 (Terraform 0.12 and later) can be compared")]
    UnsupportedVersion { side: Side, version: String },
}

/// Compare two Terraform state JSON documents (format version 4) and summarise what changed
/// from `from` to `to`. States of different lineages are compared all the same (both are in
/// the answer). A resource instance has changed when its `attributes` (or `attributes_flat`,
/// in states upgraded from format 3) differ; an output when its value, type or sensitivity does.
pub fn diff(from: &[u8], to: &[u8]) -> Result<Value, DiffError> {
    let from_doc = parse(from, Side::From)?;
    let to_doc = parse(to, Side::To)?;
    if let Some(answer) = client_encrypted(&from_doc, &to_doc) {
        return Ok(answer);
    }
    let old = State::read(&from_doc, Side::From)?;
    let new = State::read(&to_doc, Side::To)?;
    Ok(json!({
        "from": {"serial": old.serial, "lineage": old.lineage},
        "to": {"serial": new.serial, "lineage": new.lineage},
        "outputs": diff_outputs(&old.outputs, &new.outputs),
        "resources": diff_resources(&old.instances, &new.instances),
    }))
}

/// States that the client encrypted (OpenTofu's state encryption keeps `serial` and `lineage`
/// in clear beside `encrypted_data`) cannot be compared: say so, with what is in clear,
/// instead of calling them broken.
fn client_encrypted(from: &Value, to: &Value) -> Option<Value> {
    let sealed = |doc: &Value| doc.get("encrypted_data").is_some();
    if !sealed(from) && !sealed(to) {
        return None;
    }
    let clear = |doc: &Value| {
        json!({
            "serial": doc.get("serial").and_then(Value::as_u64),
            "lineage": doc.get("lineage").and_then(Value::as_str),
            "encrypted_by_client": sealed(doc),
        })
    };
    Some(json!({
        "from": clear(from),
        "to": clear(to),
        "encrypted_by_client": true,
        "message": "the client encrypted this state (OpenTofu state encryption): gitstate stores it as it came and cannot see what changed inside",
    }))
}

fn parse(bytes: &[u8], side: Side) -> Result<Value, DiffError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(DiffError::Empty { side });
    }
    serde_json::from_slice(bytes).map_err(|e| DiffError::NotJson { side, reason: e.to_string() })
}

/// The parts of one state a diff looks at, borrowed from the parsed document.
struct State<'a> {
    serial: u64,
    lineage: &'a str,
    outputs: BTreeMap<&'a str, Output<'a>>,
    /// Every resource instance by address, with what decides whether it changed.
    instances: BTreeMap<Address<'a>, Instance<'a>>,
}

struct Output<'a> {
    value: Option<&'a Value>,
    kind: Option<&'a Value>,
    sensitive: bool,
}

/// `attributes` and `attributes_flat` of one instance.
type Attributes<'a> = (Option<&'a Value>, Option<&'a Value>);

/// One resource instance: what decides whether it changed, and which attributes are sensitive.
#[derive(PartialEq)]
struct Instance<'a> {
    attributes: Attributes<'a>,
    sensitive: Sensitive<'a>,
}

/// The attributes of an instance Terraform marked sensitive (`sensitive_attributes`).
#[derive(Default, PartialEq)]
struct Sensitive<'a> {
    /// A mark this reader does not understand: every attribute counts as sensitive.
    all: bool,
    /// Top-level attributes named by a mark (`[{"type": "get_attr", "value": "password"}]`).
    names: std::collections::BTreeSet<&'a str>,
}

impl<'a> Sensitive<'a> {
    /// Fails closed: any mark that is not a path starting with an attribute name masks everything.
    fn read(marks: Option<&'a Value>) -> Self {
        let mut sensitive = Sensitive::default();
        let list = match marks {
            None | Some(Value::Null) => return sensitive,
            Some(Value::Array(list)) => list,
            Some(_) => return Sensitive { all: true, ..Sensitive::default() },
        };
        for mark in list {
            let first = mark.as_array().and_then(|steps| steps.first());
            let name = first
                .filter(|step| step.get("type").and_then(Value::as_str) == Some("get_attr"))
                .and_then(|step| step.get("value"))
                .and_then(Value::as_str);
            match name {
                Some(name) => {
                    sensitive.names.insert(name);
                }
                None => sensitive.all = true,
            }
        }
        sensitive
    }

    /// Whether attribute `name` (or a flat `name.key`) is sensitive.
    fn masks(&self, name: &str) -> bool {
        self.all || self.names.contains(name.split('.').next().unwrap_or(name))
    }
}

impl<'a> State<'a> {
    fn read(doc: &'a Value, side: Side) -> Result<Self, DiffError> {
        let bad = |reason: String| DiffError::NotAState { side, reason };
        let doc = doc.as_object().ok_or_else(|| bad("the document is not a JSON object".into()))?;
        match doc.get("version") {
            Some(v) if v.as_u64() == Some(4) => {}
            Some(Value::Number(n)) => return Err(DiffError::UnsupportedVersion { side, version: n.to_string() }),
            Some(_) => return Err(bad("`version` must be a number".into())),
            None => return Err(bad("`version` is missing".into())),
        }
        let serial = match doc.get("serial") {
            Some(s) => s.as_u64().ok_or_else(|| bad("`serial` must be a whole number".into()))?,
            None => return Err(bad("`serial` is missing".into())),
        };
        let lineage = match doc.get("lineage") {
            Some(l) => l.as_str().ok_or_else(|| bad("`lineage` must be a string".into()))?,
            None => return Err(bad("`lineage` is missing".into())),
        };
        let outputs = read_outputs(doc, &bad)?;
        let mut instances = BTreeMap::new();
        let resources = match doc.get("resources") {
            None | Some(Value::Null) => &[][..],
            Some(Value::Array(list)) => list.as_slice(),
            Some(_) => return Err(bad("`resources` must be an array".into())),
        };
        for (i, resource) in resources.iter().enumerate() {
            read_resource(resource, i, &bad, &mut instances)?;
        }
        Ok(State { serial, lineage, outputs, instances })
    }
}

type Bad<'b> = dyn Fn(String) -> DiffError + 'b;

fn read_outputs<'a>(doc: &'a Map<String, Value>, bad: &Bad<'_>) -> Result<BTreeMap<&'a str, Output<'a>>, DiffError> {
    let mut outputs = BTreeMap::new();
    match doc.get("outputs") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (name, output) in map {
                let output = output.as_object().ok_or_else(|| bad(format!("output {name:?} is not a JSON object")))?;
                outputs.insert(name.as_str(), Output::read(output));
            }
        }
        Some(_) => return Err(bad("`outputs` must be a JSON object".into())),
    }
    Ok(outputs)
}

/// The instances of `resources[i]`, each under its address.
fn read_resource<'a>(
    resource: &'a Value,
    i: usize,
    bad: &Bad<'_>,
    instances: &mut BTreeMap<Address<'a>, Instance<'a>>,
) -> Result<(), DiffError> {
    let resource = resource.as_object().ok_or_else(|| bad(format!("`resources[{i}]` is not a JSON object")))?;
    let text = |field: &str, required: bool| -> Result<Option<&'a str>, DiffError> {
        match resource.get(field) {
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            None | Some(Value::Null) if !required => Ok(None),
            None => Err(bad(format!("`resources[{i}].{field}` is missing"))),
            Some(_) => Err(bad(format!("`resources[{i}].{field}` must be a string"))),
        }
    };
    let module = text("module", false)?.unwrap_or("");
    let data = text("mode", false)? == Some("data");
    let (kind, name) = (text("type", true)?.unwrap_or(""), text("name", true)?.unwrap_or(""));
    let list = match resource.get("instances") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(list)) => list.as_slice(),
        Some(_) => return Err(bad(format!("`resources[{i}].instances` must be an array"))),
    };
    for (j, instance) in list.iter().enumerate() {
        let at = |field: &str| format!("`resources[{i}].instances[{j}]{field}`");
        let instance = instance.as_object().ok_or_else(|| bad(format!("{} is not a JSON object", at(""))))?;
        let key = match instance.get("index_key") {
            None | Some(Value::Null) => Key::None,
            Some(Value::Number(n)) => n.as_i64().map(Key::Number).unwrap_or_else(|| Key::Other(n.to_string())),
            Some(Value::String(s)) => Key::String(s),
            Some(_) => return Err(bad(format!("{} must be a number or a string", at(".index_key")))),
        };
        let deposed = match instance.get("deposed") {
            None | Some(Value::Null) => None,
            Some(Value::String(d)) => Some(d.as_str()),
            Some(_) => return Err(bad(format!("{} must be a string", at(".deposed")))),
        };
        let address = Address { module, data, kind, name, key, deposed };
        let sensitive = Sensitive::read(instance.get("sensitive_attributes"));
        let attributes = (instance.get("attributes"), instance.get("attributes_flat"));
        instances.insert(address, Instance { attributes, sensitive });
    }
    Ok(())
}

impl<'a> Output<'a> {
    fn read(output: &'a Map<String, Value>) -> Self {
        // Anything but an absent or `false` flag counts as sensitive: a malformed flag must
        // never let a value through.
        let sensitive = !matches!(output.get("sensitive"), None | Some(Value::Null) | Some(Value::Bool(false)));
        Output { value: output.get("value"), kind: output.get("type"), sensitive }
    }
}

/// The address of one resource instance, ordered the way a reader expects a list of them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Address<'a> {
    module: &'a str,
    data: bool,
    kind: &'a str,
    name: &'a str,
    key: Key<'a>,
    deposed: Option<&'a str>,
}

/// An instance key: none (a single instance), a `count` index, a `for_each` key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key<'a> {
    None,
    Number(i64),
    /// A number that is not a whole one (never written by Terraform), shown as it is.
    Other(String),
    String(&'a str),
}

impl fmt::Display for Address<'_> {
    /// As Terraform prints it: `module.vpc.data.aws_ami.x["key"]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.module.is_empty() {
            write!(f, "{}.", self.module)?;
        }
        if self.data {
            f.write_str("data.")?;
        }
        write!(f, "{}.{}", self.kind, self.name)?;
        match &self.key {
            Key::None => {}
            Key::Number(n) => write!(f, "[{n}]")?,
            Key::Other(n) => write!(f, "[{n}]")?,
            // A JSON string literal: quotes and backslashes escaped, as Terraform's own quoting does.
            Key::String(s) => write!(f, "[{}]", Value::from(*s))?,
        }
        if let Some(d) = self.deposed {
            write!(f, " (deposed object {d})")?;
        }
        Ok(())
    }
}

fn diff_outputs(old: &BTreeMap<&str, Output<'_>>, new: &BTreeMap<&str, Output<'_>>) -> Value {
    let (mut added, mut removed, mut changed) = (Vec::new(), Vec::new(), Vec::new());
    for (name, o) in old {
        match new.get(name) {
            None => removed.push(json!({"name": name, "sensitive": o.sensitive})),
            Some(n) if (o.value, o.kind, o.sensitive) == (n.value, n.kind, n.sensitive) => {}
            // Sensitive on either side: that it changed is all the answer says.
            Some(n) if o.sensitive || n.sensitive => changed.push(json!({"name": name, "sensitive": true})),
            Some(n) => changed.push(json!({
                "name": name,
                "sensitive": false,
                "from": o.value.unwrap_or(&Value::Null),
                "to": n.value.unwrap_or(&Value::Null),
            })),
        }
    }
    for (name, n) in new.iter().filter(|(name, _)| !old.contains_key(*name)) {
        added.push(match n.sensitive {
            true => json!({"name": name, "sensitive": true}),
            false => json!({"name": name, "sensitive": false, "value": n.value.unwrap_or(&Value::Null)}),
        });
    }
    json!({"added": added, "removed": removed, "changed": changed})
}

fn diff_resources(old: &BTreeMap<Address<'_>, Instance<'_>>, new: &BTreeMap<Address<'_>, Instance<'_>>) -> Value {
    let (mut added, mut removed, mut changed) = (Vec::new(), Vec::new(), Vec::new());
    for (address, instance) in old {
        match new.get(address) {
            None => removed.push(address.to_string()),
            Some(now) if now.attributes != instance.attributes => changed.push(address.to_string()),
            Some(_) => {}
        }
    }
    added.extend(new.keys().filter(|a| !old.contains_key(*a)).map(|a| a.to_string()));
    json!({"added": added, "removed": removed, "changed": changed})
}

/// Characters of one value a comparison shows at most (the rest is cut, with `…`).
pub const MAX_VALUE_CHARS: usize = 2000;
/// Resource instances a comparison lists at most (the count of the rest is given).
const MAX_RESOURCE_CHANGES: usize = 2000;

/// What a comparison says of one side.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Head {
    pub serial: Option<u64>,
    pub lineage: Option<String>,
}

/// How one output or resource instance differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Added,
    Removed,
    Changed,
}

/// An output that differs. Values are compact JSON, never given for a sensitive output.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OutputChange {
    pub name: String,
    pub change: Change,
    pub sensitive: bool,
    pub from: Option<String>,
    pub to: Option<String>,
}

/// A resource instance that differs; `attributes` lists the changed ones of a changed instance.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ResourceChange {
    pub address: String,
    pub change: Change,
    pub attributes: Vec<AttributeChange>,
}

/// One attribute side by side. A sensitive attribute (marked so on either side) has no values.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AttributeChange {
    pub name: String,
    pub sensitive: bool,
    pub from: Option<String>,
    pub to: Option<String>,
}

/// Two versions compared attribute by attribute: what the web view's diff page shows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Comparison {
    pub from: Head,
    pub to: Head,
    /// The client encrypted a side (OpenTofu state encryption): nothing inside can be compared.
    pub encrypted_by_client: bool,
    /// Sorted by name.
    pub outputs: Vec<OutputChange>,
    /// In address order.
    pub resources: Vec<ResourceChange>,
    /// Resource changes past [`MAX_RESOURCE_CHANGES`], not listed.
    pub resources_more: usize,
}

/// `value` as compact JSON, cut at [`MAX_VALUE_CHARS`] characters.
pub fn shown(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() <= MAX_VALUE_CHARS {
        return text;
    }
    let mut cut: String = text.chars().take(MAX_VALUE_CHARS).collect();
    cut.push('…');
    cut
}

/// Compare two versions as [`diff`] does, with the changed attributes of each changed instance
/// side by side. Sensitive outputs and attributes are named, never shown.
pub fn compare(from: &[u8], to: &[u8]) -> Result<Comparison, DiffError> {
    let from_doc = parse(from, Side::From)?;
    let to_doc = parse(to, Side::To)?;
    let head = |doc: &Value| Head {
        serial: doc.get("serial").and_then(Value::as_u64),
        lineage: doc.get("lineage").and_then(Value::as_str).map(str::to_owned),
    };
    let mut comparison = Comparison {
        from: head(&from_doc),
        to: head(&to_doc),
        encrypted_by_client: false,
        outputs: Vec::new(),
        resources: Vec::new(),
        resources_more: 0,
    };
    if client_encrypted(&from_doc, &to_doc).is_some() {
        comparison.encrypted_by_client = true;
        return Ok(comparison);
    }
    let old = State::read(&from_doc, Side::From)?;
    let new = State::read(&to_doc, Side::To)?;

    let names: std::collections::BTreeSet<&str> = old.outputs.keys().chain(new.outputs.keys()).copied().collect();
    for name in names {
        let value = |o: &Output<'_>| Some(shown(o.value.unwrap_or(&Value::Null)));
        let row = match (old.outputs.get(name), new.outputs.get(name)) {
            (Some(o), None) => (Change::Removed, o.sensitive, None, None),
            (None, Some(n)) if n.sensitive => (Change::Added, true, None, None),
            (None, Some(n)) => (Change::Added, false, None, value(n)),
            (Some(o), Some(n)) if (o.value, o.kind, o.sensitive) == (n.value, n.kind, n.sensitive) => continue,
            (Some(o), Some(n)) if o.sensitive || n.sensitive => (Change::Changed, true, None, None),
            (Some(o), Some(n)) => (Change::Changed, false, value(o), value(n)),
            (None, None) => continue,
        };
        let (change, sensitive, from, to) = row;
        comparison.outputs.push(OutputChange { name: name.to_owned(), change, sensitive, from, to });
    }

    let addresses: std::collections::BTreeSet<&Address<'_>> =
        old.instances.keys().chain(new.instances.keys()).collect();
    for address in addresses {
        let change = match (old.instances.get(address), new.instances.get(address)) {
            (Some(_), None) => {
                ResourceChange { address: address.to_string(), change: Change::Removed, attributes: vec![] }
            }
            (None, Some(_)) => {
                ResourceChange { address: address.to_string(), change: Change::Added, attributes: vec![] }
            }
            (Some(o), Some(n)) if o.attributes != n.attributes => ResourceChange {
                address: address.to_string(),
                change: Change::Changed,
                attributes: attribute_changes(o, n),
            },
            _ => continue,
        };
        if comparison.resources.len() >= MAX_RESOURCE_CHANGES {
            comparison.resources_more += 1;
            continue;
        }
        comparison.resources.push(change);
    }
    Ok(comparison)
}

/// The attributes that differ between two versions of an instance, by name.
fn attribute_changes(old: &Instance<'_>, new: &Instance<'_>) -> Vec<AttributeChange> {
    let map =
        |i: &Instance<'_>| i.attributes.0.or(i.attributes.1).and_then(Value::as_object).cloned().unwrap_or_default();
    let (before, after) = (map(old), map(new));
    let names: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    let mut rows = Vec::new();
    for name in names {
        let (a, b) = (before.get(name), after.get(name));
        if a == b {
            continue;
        }
        let sensitive = old.sensitive.masks(name) || new.sensitive.masks(name);
        let show = |v: Option<&Value>| if sensitive { None } else { v.map(shown) };
        rows.push(AttributeChange { name: name.clone(), sensitive, from: show(a), to: show(b) });
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(serial: u64, outputs: Value, resources: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "version": 4,
            "terraform_version": "1.0.3",
            "serial": serial,
            "lineage": "3f1e2c4a-0000-4000-8000-000000000001",
            "outputs": outputs,
            "resources": resources,
        }))
        .unwrap()
    }

    fn resource(module: Option<&str>, mode: &str, kind: &str, name: &str, instances: Value) -> Value {
        let mut r = json!({
            "mode": mode,
            "type": kind,
            "name": name,
            "provider": "provider[\"registry.terraform.io/hashicorp/aws\"]",
            "instances": instances,
        });
        if let Some(m) = module {
            r["module"] = json!(m);
        }
        r
    }

    fn instance(index_key: Option<Value>, attributes: Value) -> Value {
        let mut i =
            json!({"schema_version": 1, "attributes": attributes, "sensitive_attributes": [], "private": "bnVsbA=="});
        if let Some(k) = index_key {
            i["index_key"] = k;
        }
        i
    }

    fn list<'a>(answer: &'a Value, section: &str, kind: &str) -> &'a Value {
        &answer[section][kind]
    }

    fn empty() -> Value {
        json!({"added": [], "removed": [], "changed": []})
    }

    #[test]
    fn outputs_added_removed_and_changed() {
        let from = state(
            1,
            json!({
                "kept": {"value": "same", "type": "string"},
                "gone": {"value": 1, "type": "number"},
                "moved": {"value": ["a", "b"], "type": ["list", "string"]},
            }),
            json!([]),
        );
        let to = state(
            2,
            json!({
                "kept": {"value": "same", "type": "string"},
                "moved": {"value": ["a", "c"], "type": ["list", "string"]},
                "fresh": {"value": {"k": true}, "type": ["object", {"k": "bool"}]},
            }),
            json!([]),
        );
        let answer = diff(&from, &to).unwrap();
        assert_eq!(answer["from"], json!({"serial": 1, "lineage": "3f1e2c4a-0000-4000-8000-000000000001"}));
        assert_eq!(answer["to"]["serial"], json!(2));
        assert_eq!(
            answer["outputs"],
            json!({
                "added": [{"name": "fresh", "sensitive": false, "value": {"k": true}}],
                "removed": [{"name": "gone", "sensitive": false}],
                "changed": [{"name": "moved", "sensitive": false, "from": ["a", "b"], "to": ["a", "c"]}],
            })
        );
        assert_eq!(answer["resources"], empty());
    }

    #[test]
    fn outputs_are_sorted_by_name() {
        let from = state(1, json!({}), json!([]));
        let to = state(
            2,
            json!({"b": {"value": 1, "type": "number"}, "a": {"value": 2, "type": "number"}, "c": {"value": 3, "type": "number"}}),
            json!([]),
        );
        let answer = diff(&from, &to).unwrap();
        let names: Vec<_> = list(&answer, "outputs", "added").as_array().unwrap().iter().map(|o| &o["name"]).collect();
        assert_eq!(names, [&json!("a"), &json!("b"), &json!("c")]);
    }

    #[test]
    fn sensitive_output_values_never_reach_the_answer() {
        let from = state(
            1,
            json!({
                "password": {"value": "hunter2-old-secret", "type": "string", "sensitive": true},
                "dropped": {"value": "dropped-secret", "type": "string", "sensitive": true},
                "revealed": {"value": "was-secret-once", "type": "string", "sensitive": true},
                "hidden": {"value": "plain-before", "type": "string"},
                "quiet": {"value": "unchanged-secret", "type": "string", "sensitive": true},
            }),
            json!([]),
        );
        let to = state(
            2,
            json!({
                "password": {"value": "hunter2-new-secret", "type": "string", "sensitive": true},
                "token": {"value": "new-token-secret", "type": "string", "sensitive": true},
                "revealed": {"value": "now-plain", "type": "string"},
                "hidden": {"value": "secret-after", "type": "string", "sensitive": true},
                "quiet": {"value": "unchanged-secret", "type": "string", "sensitive": true},
            }),
            json!([]),
        );
        let answer = diff(&from, &to).unwrap();
        let text = serde_json::to_string(&answer).unwrap();
        for secret in [
            "hunter2",
            "dropped-secret",
            "was-secret-once",
            "now-plain",
            "plain-before",
            "secret-after",
            "new-token-secret",
            "unchanged-secret",
        ] {
            assert!(!text.contains(secret), "{secret:?} leaked into {text}");
        }
        assert_eq!(
            answer["outputs"],
            json!({
                "added": [{"name": "token", "sensitive": true}],
                "removed": [{"name": "dropped", "sensitive": true}],
                "changed": [
                    {"name": "hidden", "sensitive": true},
                    {"name": "password", "sensitive": true},
                    {"name": "revealed", "sensitive": true},
                ],
            })
        );
    }

    #[test]
    fn a_malformed_sensitive_flag_counts_as_sensitive() {
        let from = state(1, json!({}), json!([]));
        let to = state(2, json!({"odd": {"value": "odd-secret", "type": "string", "sensitive": "yes"}}), json!([]));
        let text = serde_json::to_string(&diff(&from, &to).unwrap()).unwrap();
        assert!(!text.contains("odd-secret"), "{text}");
    }

    #[test]
    fn count_instances_use_number_indexes_in_numeric_order() {
        let web = |n: u64| instance(Some(json!(n)), json!({"id": format!("i-{n}")}));
        let from =
            state(1, json!({}), json!([resource(None, "managed", "aws_instance", "web", json!([web(0), web(1)]))]));
        let to = state(
            2,
            json!({}),
            json!([resource(None, "managed", "aws_instance", "web", json!([web(0), web(1), web(2), web(10)]))]),
        );
        let answer = diff(&from, &to).unwrap();
        assert_eq!(list(&answer, "resources", "added"), &json!(["aws_instance.web[2]", "aws_instance.web[10]"]));
        assert_eq!(list(&answer, "resources", "removed"), &json!([]));
        assert_eq!(list(&answer, "resources", "changed"), &json!([]));
        // And back: the instances go.
        let back = diff(&to, &from).unwrap();
        assert_eq!(list(&back, "resources", "removed"), &json!(["aws_instance.web[2]", "aws_instance.web[10]"]));
    }

    #[test]
    fn for_each_instances_use_quoted_string_keys() {
        let bucket = |k: &str| instance(Some(json!(k)), json!({"bucket": k}));
        let from =
            state(1, json!({}), json!([resource(None, "managed", "aws_s3_bucket", "b", json!([bucket("logs")]))]));
        let to = state(
            2,
            json!({}),
            json!([resource(None, "managed", "aws_s3_bucket", "b", json!([bucket("assets"), bucket("say \"hi\"\\")]))]),
        );
        let answer = diff(&from, &to).unwrap();
        assert_eq!(
            list(&answer, "resources", "added"),
            &json!(["aws_s3_bucket.b[\"assets\"]", "aws_s3_bucket.b[\"say \\\"hi\\\"\\\\\"]"])
        );
        assert_eq!(list(&answer, "resources", "removed"), &json!(["aws_s3_bucket.b[\"logs\"]"]));
    }

    #[test]
    fn module_resources_carry_the_module_path() {
        let subnet = instance(Some(json!(0)), json!({"cidr_block": "10.0.0.0/24"}));
        let from = state(1, json!({}), json!([]));
        let to = state(
            2,
            json!({}),
            json!([
                resource(Some("module.vpc"), "managed", "aws_subnet", "a", json!([subnet.clone()])),
                resource(
                    Some("module.app[\"eu\"].module.net"),
                    "managed",
                    "aws_vpc",
                    "main",
                    json!([instance(None, json!({"id": "vpc-1"}))])
                ),
                resource(None, "managed", "aws_vpc", "main", json!([instance(None, json!({"id": "vpc-2"}))])),
            ]),
        );
        let answer = diff(&from, &to).unwrap();
        assert_eq!(
            list(&answer, "resources", "added"),
            &json!(["aws_vpc.main", "module.app[\"eu\"].module.net.aws_vpc.main", "module.vpc.aws_subnet.a[0]"])
        );
    }

    #[test]
    fn data_sources_carry_the_data_prefix() {
        let ami = |id: &str| instance(None, json!({"id": id}));
        let from = state(
            1,
            json!({}),
            json!([
                resource(None, "data", "aws_ami", "ubuntu", json!([ami("ami-1")])),
                resource(Some("module.vpc"), "data", "aws_availability_zones", "all", json!([ami("zones")])),
            ]),
        );
        let to = state(
            2,
            json!({}),
            json!([
                resource(None, "data", "aws_ami", "ubuntu", json!([ami("ami-2")])),
                // A managed resource of the same type and name is another address.
                resource(None, "managed", "aws_ami", "ubuntu", json!([ami("ami-3")])),
            ]),
        );
        let answer = diff(&from, &to).unwrap();
        assert_eq!(
            answer["resources"],
            json!({
                "added": ["aws_ami.ubuntu"],
                "removed": ["module.vpc.data.aws_availability_zones.all"],
                "changed": ["data.aws_ami.ubuntu"],
            })
        );
    }

    #[test]
    fn only_attribute_changes_make_an_instance_changed() {
        let web = |ami: &str, private: &str, flat: Option<Value>| {
            let mut i = instance(None, json!({"ami": ami, "tags": {"a": "1", "b": "2"}}));
            i["private"] = json!(private);
            if let Some(flat) = flat {
                i.as_object_mut().unwrap().remove("attributes");
                i["attributes_flat"] = flat;
            }
            i
        };
        let from = state(
            1,
            json!({}),
            json!([
                resource(None, "managed", "aws_instance", "changed", json!([web("ami-1", "p", None)])),
                resource(None, "managed", "aws_instance", "same", json!([web("ami-1", "p", None)])),
                resource(None, "managed", "aws_instance", "private_only", json!([web("ami-1", "p1", None)])),
                resource(None, "managed", "aws_instance", "flat", json!([web("", "p", Some(json!({"ami": "ami-1"})))])),
            ]),
        );
        let to = state(
            2,
            json!({}),
            json!([
                resource(None, "managed", "aws_instance", "changed", json!([web("ami-2", "p", None)])),
                resource(None, "managed", "aws_instance", "same", json!([web("ami-1", "p", None)])),
                resource(None, "managed", "aws_instance", "private_only", json!([web("ami-1", "p2", None)])),
                resource(None, "managed", "aws_instance", "flat", json!([web("", "p", Some(json!({"ami": "ami-2"})))])),
            ]),
        );
        let answer = diff(&from, &to).unwrap();
        assert_eq!(
            answer["resources"],
            json!({"added": [], "removed": [], "changed": ["aws_instance.changed", "aws_instance.flat"]})
        );
    }

    #[test]
    fn key_order_and_formatting_do_not_count_as_changes() {
        let from = br#"{"version":4,"serial":1,"lineage":"l","outputs":{"o":{"value":{"a":1,"b":2},"type":"x"}},
            "resources":[{"mode":"managed","type":"t","name":"n","instances":[{"attributes":{"x":1,"y":[1,2]}}]}]}"#;
        let to = br#"{ "lineage" : "l", "serial" : 1, "version" : 4,
            "resources" : [ { "instances" : [ { "attributes" : { "y" : [1, 2], "x" : 1 } } ], "name" : "n", "type" : "t", "mode" : "managed" } ],
            "outputs" : { "o" : { "type" : "x", "value" : { "b" : 2, "a" : 1 } } } }"#;
        let answer = diff(from, to).unwrap();
        assert_eq!(answer["outputs"], empty());
        assert_eq!(answer["resources"], empty());
    }

    #[test]
    fn identical_states_have_empty_lists() {
        let s = state(
            7,
            json!({"ip": {"value": "10.0.0.1", "type": "string"}, "pw": {"value": "pw-secret", "type": "string", "sensitive": true}}),
            json!([
                resource(
                    None,
                    "managed",
                    "aws_instance",
                    "web",
                    json!([instance(Some(json!(0)), json!({"id": "i-0"}))])
                ),
                resource(Some("module.vpc"), "data", "aws_ami", "x", json!([instance(None, json!({"id": "ami"}))])),
            ]),
        );
        let answer = diff(&s, &s).unwrap();
        assert_eq!(
            answer,
            json!({
                "from": {"serial": 7, "lineage": "3f1e2c4a-0000-4000-8000-000000000001"},
                "to": {"serial": 7, "lineage": "3f1e2c4a-0000-4000-8000-000000000001"},
                "outputs": empty(),
                "resources": empty(),
            })
        );
    }

    #[test]
    fn missing_outputs_and_resources_read_as_none() {
        let bare = br#"{"version": 4, "serial": 0, "lineage": "l"}"#;
        let full = state(
            1,
            json!({"o": {"value": 1, "type": "number"}}),
            json!([resource(None, "managed", "t", "n", json!([instance(None, json!({}))]))]),
        );
        let answer = diff(bare, &full).unwrap();
        assert_eq!(list(&answer, "outputs", "added"), &json!([{"name": "o", "sensitive": false, "value": 1}]));
        assert_eq!(list(&answer, "resources", "added"), &json!(["t.n"]));
    }

    #[test]
    fn other_lineages_are_compared_and_both_reported() {
        let from = state(5, json!({}), json!([]));
        let mut other: Value = serde_json::from_slice(&state(1, json!({}), json!([]))).unwrap();
        other["lineage"] = json!("another-lineage");
        let to = serde_json::to_vec(&other).unwrap();
        let answer = diff(&from, &to).unwrap();
        assert_eq!(answer["from"], json!({"serial": 5, "lineage": "3f1e2c4a-0000-4000-8000-000000000001"}));
        assert_eq!(answer["to"], json!({"serial": 1, "lineage": "another-lineage"}));
    }

    #[test]
    fn deposed_objects_get_addresses_of_their_own() {
        let mut deposed = instance(None, json!({"id": "i-old"}));
        deposed["deposed"] = json!("00000001");
        let current = instance(None, json!({"id": "i-new"}));
        let from =
            state(1, json!({}), json!([resource(None, "managed", "aws_instance", "web", json!([current.clone()]))]));
        let to =
            state(2, json!({}), json!([resource(None, "managed", "aws_instance", "web", json!([current, deposed]))]));
        let answer = diff(&from, &to).unwrap();
        assert_eq!(
            answer["resources"],
            json!({"added": ["aws_instance.web (deposed object 00000001)"], "removed": [], "changed": []})
        );
    }

    #[test]
    fn unreadable_sides_are_typed_errors() {
        let good = state(1, json!({}), json!([]));
        type Case<'a> = (&'a [u8], fn(&DiffError) -> bool);
        let cases: &[Case] = &[
            (b"", |e| matches!(e, DiffError::Empty { .. })),
            (b"  \n", |e| matches!(e, DiffError::Empty { .. })),
            (b"{\"version\": 4, \"serial\": ", |e| matches!(e, DiffError::NotJson { .. })),
            (b"-----BEGIN AGE ENCRYPTED FILE-----", |e| matches!(e, DiffError::NotJson { .. })),
            (b"[1, 2]", |e| matches!(e, DiffError::NotAState { .. })),
            (br#"{"serial": 1, "lineage": "l"}"#, |e| matches!(e, DiffError::NotAState { .. })),
            (br#"{"version": "4", "serial": 1, "lineage": "l"}"#, |e| matches!(e, DiffError::NotAState { .. })),
            (br#"{"version": 4, "lineage": "l"}"#, |e| matches!(e, DiffError::NotAState { .. })),
            (br#"{"version": 4, "serial": -1, "lineage": "l"}"#, |e| matches!(e, DiffError::NotAState { .. })),
            (br#"{"version": 4, "serial": 1}"#, |e| matches!(e, DiffError::NotAState { .. })),
            (br#"{"version": 4, "serial": 1, "lineage": "l", "outputs": []}"#, |e| {
                matches!(e, DiffError::NotAState { .. })
            }),
            (br#"{"version": 4, "serial": 1, "lineage": "l", "outputs": {"o": 1}}"#, |e| {
                matches!(e, DiffError::NotAState { .. })
            }),
            (br#"{"version": 4, "serial": 1, "lineage": "l", "resources": {}}"#, |e| {
                matches!(e, DiffError::NotAState { .. })
            }),
            (br#"{"version": 4, "serial": 1, "lineage": "l", "resources": [{"mode": "managed", "name": "n"}]}"#, |e| {
                matches!(e, DiffError::NotAState { reason, .. } if reason.contains("`resources[0].type` is missing"))
            }),
            (
                br#"{"version": 4, "serial": 1, "lineage": "l", "resources": [{"type": "t", "name": "n", "instances": [{"index_key": true}]}]}"#,
                |e| matches!(e, DiffError::NotAState { reason, .. } if reason.contains("index_key")),
            ),
            (br#"{"version": 3, "serial": 1, "lineage": "l", "modules": []}"#, |e| {
                matches!(e, DiffError::UnsupportedVersion { version, .. } if version == "3")
            }),
        ];
        for (bad, expected) in cases {
            let shown = String::from_utf8_lossy(bad);
            let e = diff(bad, &good).unwrap_err();
            assert!(expected(&e), "{shown}: {e:?}");
            assert!(
                matches!(
                    e,
                    DiffError::Empty { side: Side::From }
                        | DiffError::NotJson { side: Side::From, .. }
                        | DiffError::NotAState { side: Side::From, .. }
                        | DiffError::UnsupportedVersion { side: Side::From, .. }
                ),
                "{shown}: {e:?}"
            );
            assert!(e.to_string().starts_with("the `from` version "), "{e}");
            let e = diff(&good, bad).unwrap_err();
            assert!(expected(&e), "{shown}: {e:?}");
            assert!(e.to_string().starts_with("the `to` version "), "{e}");
        }
    }

    #[test]
    fn error_messages_read_well_and_hold_no_state_content() {
        let good = state(1, json!({}), json!([]));
        let e = diff(b"{\"password\": \"pw-secret\"", &good).unwrap_err();
        assert!(!e.to_string().contains("pw-secret"), "{e}");
        assert_eq!(
            diff(&good, br#"{"version": 4, "lineage": "l"}"#).unwrap_err().to_string(),
            "the `to` version is not a Terraform state: `serial` is missing"
        );
        assert_eq!(
            diff(br#"{"version": 3}"#, &good).unwrap_err().to_string(),
            "the `from` version is a state of format version 3; only format version 4 (Terraform 0.12 and later) can be compared"
        );
        assert_eq!(diff(b"", &good).unwrap_err(), DiffError::Empty { side: Side::From },);
    }

    #[test]
    fn compare_masks_sensitive_attributes_and_outputs() {
        let web = |ami: &str, password: &str| {
            let mut i = instance(None, json!({"ami": ami, "password": password, "tags": {"a": "1"}}));
            i["sensitive_attributes"] = json!([[{"type": "get_attr", "value": "password"}]]);
            i
        };
        let odd = |v: &str| {
            let mut i = instance(None, json!({"x": v}));
            i["sensitive_attributes"] = json!(["not a path"]);
            i
        };
        let from = state(
            1,
            json!({"pw": {"value": "old-output-secret", "type": "string", "sensitive": true}, "ip": {"value": "a", "type": "string"}}),
            json!([
                resource(None, "managed", "aws_instance", "web", json!([web("ami-1", "old-attr-secret")])),
                resource(None, "managed", "t", "odd", json!([odd("odd-old-secret")])),
            ]),
        );
        let to = state(
            2,
            json!({"pw": {"value": "new-output-secret", "type": "string", "sensitive": true}, "ip": {"value": "b", "type": "string"}}),
            json!([
                resource(None, "managed", "aws_instance", "web", json!([web("ami-2", "new-attr-secret")])),
                resource(None, "managed", "t", "odd", json!([odd("odd-new-secret")])),
            ]),
        );
        let c = compare(&from, &to).unwrap();
        let text = serde_json::to_string(&c).unwrap();
        for secret in ["output-secret", "attr-secret", "odd-old-secret", "odd-new-secret"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        assert_eq!(c.outputs.len(), 2);
        assert_eq!((c.outputs[0].name.as_str(), c.outputs[0].from.as_deref()), ("ip", Some("\"a\"")));
        assert!(c.outputs[1].sensitive && c.outputs[1].to.is_none());
        let web = &c.resources[0];
        assert_eq!(web.address, "aws_instance.web");
        let names: Vec<_> = web.attributes.iter().map(|a| (a.name.as_str(), a.sensitive)).collect();
        assert_eq!(names, [("ami", false), ("password", true)]);
        assert_eq!(web.attributes[0].to.as_deref(), Some("\"ami-2\""));
        // A mark that is not understood masks every attribute of its instance.
        assert!(c.resources[1].attributes.iter().all(|a| a.sensitive && a.from.is_none()));
        assert_eq!(shown(&json!("x".repeat(3000))).chars().count(), MAX_VALUE_CHARS + 1);
    }
}
