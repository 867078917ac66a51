//! A `serde_json::Value` deserializer that only accepts mappings for structs.
//!
//! serde's derived `Deserialize` also accepts a struct written as a sequence of its field values, so with a plain
//! `Value` deserializer `source: [["a"]]` would silently become `principals: ["a"]`. Kubernetes objects never
//! have that form; this wrapper rejects it everywhere, recursively. Map keys are strings that may be read as
//! integers (`portLevelMtls: {"8080": ...}`).

use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, SeqAccess, Unexpected, Visitor};
use serde_json::{Map, Value};

pub(crate) struct StrictValue(pub(crate) Value);

fn unexpected(v: &Value) -> Unexpected<'_> {
    match v {
        Value::Null => Unexpected::Unit,
        Value::Bool(b) => Unexpected::Bool(*b),
        Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => Unexpected::Unsigned(u),
            (_, Some(i), _) => Unexpected::Signed(i),
            (_, _, Some(f)) => Unexpected::Float(f),
            _ => Unexpected::Other("number"),
        },
        Value::String(s) => Unexpected::Str(s),
        Value::Array(_) => Unexpected::Seq,
        Value::Object(_) => Unexpected::Map,
    }
}

impl<'de> Deserializer<'de> for StrictValue {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Array(items) => {
                let len = items.len();
                let mut seq = Seq { iter: items.into_iter() };
                let out = visitor.visit_seq(&mut seq)?;
                if seq.iter.len() == 0 { Ok(out) } else { Err(de::Error::invalid_length(len, &"fewer elements")) }
            }
            Value::Object(map) => visitor.visit_map(Entries { iter: map.into_iter(), value: None }),
            scalar => scalar.deserialize_any(visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Object(_) => self.deserialize_any(visitor),
            other => Err(de::Error::invalid_type(unexpected(&other), &visitor)),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        // Our enums are unit variants written as strings; serde_json handles that form.
        self.0.deserialize_enum(name, variants, visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit unit_struct seq
        tuple tuple_struct map identifier ignored_any
    }
}

struct Seq {
    iter: std::vec::IntoIter<Value>,
}

impl<'de> SeqAccess<'de> for Seq {
    type Error = serde_json::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Self::Error> {
        self.iter.next().map(|v| seed.deserialize(StrictValue(v))).transpose()
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

struct Entries {
    iter: <Map<String, Value> as IntoIterator>::IntoIter,
    value: Option<Value>,
}

impl<'de> MapAccess<'de> for Entries {
    type Error = serde_json::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Self::Error> {
        match self.iter.next() {
            Some((k, v)) => {
                self.value = Some(v);
                seed.deserialize(Key(k)).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Self::Error> {
        let v = self.value.take().ok_or_else(|| de::Error::custom("value is missing"))?;
        seed.deserialize(StrictValue(v))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

/// A mapping key: a string, or an integer written as a string.
struct Key(String);

macro_rules! int_key {
    ($($method:ident => $visit:ident: $ty:ty),* $(,)?) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
            match self.0.parse::<$ty>() {
                Ok(n) if self.0.bytes().all(|b| b.is_ascii_digit() || b == b'-') => visitor.$visit(n.into()),
                _ => Err(de::Error::invalid_value(Unexpected::Str(&self.0), &"a number")),
            }
        }
    )*};
}

impl<'de> Deserializer<'de> for Key {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_string(self.0)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        IntoDeserializer::<serde_json::Error>::into_deserializer(self.0).deserialize_enum(name, variants, visitor)
    }

    int_key! {
        deserialize_u8 => visit_u64: u8,
        deserialize_u16 => visit_u64: u16,
        deserialize_u32 => visit_u64: u32,
        deserialize_u64 => visit_u64: u64,
        deserialize_i8 => visit_i64: i8,
        deserialize_i16 => visit_i64: i16,
        deserialize_i32 => visit_i64: i32,
        deserialize_i64 => visit_i64: i64,
    }

    serde::forward_to_deserialize_any! {
        bool i128 u128 f32 f64 char str string bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Debug, Deserialize, PartialEq)]
    struct S {
        a: Vec<String>,
        #[serde(default)]
        m: BTreeMap<u32, String>,
        o: Option<Box<S>>,
    }

    #[test]
    fn structs_must_be_mappings() {
        let ok: S =
            S::deserialize(StrictValue(serde_json::json!({"a": ["x"], "m": {"8080": "y"}, "o": null}))).unwrap();
        assert_eq!(ok.m.get(&8080).map(String::as_str), Some("y"));
        assert!(S::deserialize(StrictValue(serde_json::json!([["x"]]))).is_err());
        assert!(S::deserialize(StrictValue(serde_json::json!({"a": [], "o": [[]]}))).is_err());
        assert!(S::deserialize(StrictValue(serde_json::json!({"a": [], "m": {"x": "y"}}))).is_err());
        assert!(S::deserialize(StrictValue(serde_json::json!({"a": [], "m": {"+1": "y"}}))).is_err());
        assert!(S::deserialize(StrictValue(serde_json::json!({"a": [1]}))).is_err());
    }
}
