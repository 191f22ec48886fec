//! Files a Protobuf schema may import that Confluent's serializers never register as
//! references, because every client is expected to have them: Google's common types
//! (`google/type/*.proto`, from googleapis) and Confluent's own (`confluent/meta.proto`,
//! `confluent/type/decimal.proto`). Google's well-known types (`google/protobuf/*.proto`)
//! are in prost-reflect's global pool already; these are described here, field for field
//! as their published definitions declare them, so a schema importing them links.
//!
//! AWS Glue's deserializers resolve two more, which its Kafka Connect converter imports
//! into the schemas it writes: `additionalTypes/decimal.proto` (a decimal as units, a
//! fraction in nanos, precision and scale) and `metadata/metadata.proto` (two string
//! field options carrying Connect's metadata).

use prost_reflect::prost_types::field_descriptor_proto::{Label, Type};
use prost_reflect::prost_types::{
    DescriptorProto, EnumDescriptorProto, EnumValueDescriptorProto, FieldDescriptorProto, FileDescriptorProto,
    MessageOptions, OneofDescriptorProto,
};

/// The file a schema imports as `name`, when it is one of the built-in ones.
pub(crate) fn file(name: &str) -> Option<FileDescriptorProto> {
    use Type::{Bytes, Double, Float, Int32, Int64, String as Str, Uint32};
    let f = match name {
        "google/type/calendar_period.proto" => proto(
            name,
            "google.type",
            &[],
            vec![],
            vec![enumeration(
                "CalendarPeriod",
                &["CALENDAR_PERIOD_UNSPECIFIED", "DAY", "WEEK", "FORTNIGHT", "MONTH", "QUARTER", "HALF", "YEAR"],
            )],
        ),
        "google/type/color.proto" => proto(
            name,
            "google.type",
            &["google/protobuf/wrappers.proto"],
            vec![message(
                "Color",
                vec![
                    scalar("red", 1, Float),
                    scalar("green", 2, Float),
                    scalar("blue", 3, Float),
                    of("alpha", 4, ".google.protobuf.FloatValue"),
                ],
            )],
            vec![],
        ),
        "google/type/date.proto" => proto(
            name,
            "google.type",
            &[],
            vec![message("Date", vec![scalar("year", 1, Int32), scalar("month", 2, Int32), scalar("day", 3, Int32)])],
            vec![],
        ),
        "google/type/datetime.proto" => {
            let mut utc_offset = of("utc_offset", 8, ".google.protobuf.Duration");
            utc_offset.oneof_index = Some(0);
            let mut time_zone = of("time_zone", 9, ".google.type.TimeZone");
            time_zone.oneof_index = Some(0);
            let mut date_time = message(
                "DateTime",
                vec![
                    scalar("year", 1, Int32),
                    scalar("month", 2, Int32),
                    scalar("day", 3, Int32),
                    scalar("hours", 4, Int32),
                    scalar("minutes", 5, Int32),
                    scalar("seconds", 6, Int32),
                    scalar("nanos", 7, Int32),
                    utc_offset,
                    time_zone,
                ],
            );
            date_time.oneof_decl = vec![oneof("time_offset")];
            proto(
                name,
                "google.type",
                &["google/protobuf/duration.proto"],
                vec![date_time, message("TimeZone", vec![scalar("id", 1, Str), scalar("version", 2, Str)])],
                vec![],
            )
        }
        "google/type/dayofweek.proto" => proto(
            name,
            "google.type",
            &[],
            vec![],
            vec![enumeration(
                "DayOfWeek",
                &[
                    "DAY_OF_WEEK_UNSPECIFIED",
                    "MONDAY",
                    "TUESDAY",
                    "WEDNESDAY",
                    "THURSDAY",
                    "FRIDAY",
                    "SATURDAY",
                    "SUNDAY",
                ],
            )],
        ),
        "google/type/decimal.proto" => {
            proto(name, "google.type", &[], vec![message("Decimal", vec![scalar("value", 1, Str)])], vec![])
        }
        "google/type/expr.proto" => proto(
            name,
            "google.type",
            &[],
            vec![message(
                "Expr",
                vec![
                    scalar("expression", 1, Str),
                    scalar("title", 2, Str),
                    scalar("description", 3, Str),
                    scalar("location", 4, Str),
                ],
            )],
            vec![],
        ),
        "google/type/fraction.proto" => proto(
            name,
            "google.type",
            &[],
            vec![message("Fraction", vec![scalar("numerator", 1, Int64), scalar("denominator", 2, Int64)])],
            vec![],
        ),
        "google/type/interval.proto" => proto(
            name,
            "google.type",
            &["google/protobuf/timestamp.proto"],
            vec![message(
                "Interval",
                vec![
                    of("start_time", 1, ".google.protobuf.Timestamp"),
                    of("end_time", 2, ".google.protobuf.Timestamp"),
                ],
            )],
            vec![],
        ),
        "google/type/latlng.proto" => proto(
            name,
            "google.type",
            &[],
            vec![message("LatLng", vec![scalar("latitude", 1, Double), scalar("longitude", 2, Double)])],
            vec![],
        ),
        "google/type/localized_text.proto" => proto(
            name,
            "google.type",
            &[],
            vec![message("LocalizedText", vec![scalar("text", 1, Str), scalar("language_code", 2, Str)])],
            vec![],
        ),
        "google/type/money.proto" => proto(
            name,
            "google.type",
            &[],
            vec![message(
                "Money",
                vec![scalar("currency_code", 1, Str), scalar("units", 2, Int64), scalar("nanos", 3, Int32)],
            )],
            vec![],
        ),
        "google/type/month.proto" => proto(
            name,
            "google.type",
            &[],
            vec![],
            vec![enumeration(
                "Month",
                &[
                    "MONTH_UNSPECIFIED",
                    "JANUARY",
                    "FEBRUARY",
                    "MARCH",
                    "APRIL",
                    "MAY",
                    "JUNE",
                    "JULY",
                    "AUGUST",
                    "SEPTEMBER",
                    "OCTOBER",
                    "NOVEMBER",
                    "DECEMBER",
                ],
            )],
        ),
        "google/type/phone_number.proto" => {
            let mut e164 = scalar("e164_number", 1, Str);
            e164.oneof_index = Some(0);
            let mut short_code = of("short_code", 2, ".google.type.PhoneNumber.ShortCode");
            short_code.oneof_index = Some(0);
            let mut phone = message("PhoneNumber", vec![e164, short_code, scalar("extension", 3, Str)]);
            phone.oneof_decl = vec![oneof("kind")];
            phone.nested_type =
                vec![message("ShortCode", vec![scalar("region_code", 1, Str), scalar("number", 2, Str)])];
            proto(name, "google.type", &[], vec![phone], vec![])
        }
        "google/type/postal_address.proto" => proto(
            name,
            "google.type",
            &[],
            vec![message(
                "PostalAddress",
                vec![
                    scalar("revision", 1, Int32),
                    scalar("region_code", 2, Str),
                    scalar("language_code", 3, Str),
                    scalar("postal_code", 4, Str),
                    scalar("sorting_code", 5, Str),
                    scalar("administrative_area", 6, Str),
                    scalar("locality", 7, Str),
                    scalar("sublocality", 8, Str),
                    repeated(scalar("address_lines", 9, Str)),
                    repeated(scalar("recipients", 10, Str)),
                    scalar("organization", 11, Str),
                ],
            )],
            vec![],
        ),
        "google/type/quaternion.proto" => proto(
            name,
            "google.type",
            &[],
            vec![message(
                "Quaternion",
                vec![scalar("x", 1, Double), scalar("y", 2, Double), scalar("z", 3, Double), scalar("w", 4, Double)],
            )],
            vec![],
        ),
        "google/type/timeofday.proto" => proto(
            name,
            "google.type",
            &[],
            vec![message(
                "TimeOfDay",
                vec![
                    scalar("hours", 1, Int32),
                    scalar("minutes", 2, Int32),
                    scalar("seconds", 3, Int32),
                    scalar("nanos", 4, Int32),
                ],
            )],
            vec![],
        ),
        "confluent/type/decimal.proto" => proto(
            name,
            "confluent.type",
            &[],
            vec![message(
                "Decimal",
                vec![scalar("value", 1, Bytes), scalar("precision", 2, Uint32), scalar("scale", 3, Int32)],
            )],
            vec![],
        ),
        "additionalTypes/decimal.proto" => proto(
            name,
            "additionalTypes",
            &[],
            vec![message(
                "Decimal",
                vec![
                    scalar("units", 1, Int64),
                    scalar("fraction", 2, Int32),
                    scalar("precision", 3, Uint32),
                    scalar("scale", 4, Int32),
                ],
            )],
            vec![],
        ),
        "metadata/metadata.proto" => {
            let mut file = proto(name, "metadata", &["google/protobuf/descriptor.proto"], vec![], vec![]);
            // `[(metadata.metadata_key) = "...", (metadata.metadata_value) = "..."]` on fields.
            file.extension = [("metadata_key", 50001), ("metadata_value", 50002)]
                .into_iter()
                .map(|(field, number)| FieldDescriptorProto {
                    extendee: Some(".google.protobuf.FieldOptions".into()),
                    ..scalar(field, number, Str)
                })
                .collect();
            file
        }
        "confluent/meta.proto" => {
            let mut entry = message("ParamsEntry", vec![scalar("key", 1, Str), scalar("value", 2, Str)]);
            entry.options = Some(MessageOptions { map_entry: Some(true), ..Default::default() });
            let mut meta = message(
                "Meta",
                vec![
                    scalar("doc", 1, Str),
                    repeated(of("params", 2, ".confluent.Meta.ParamsEntry")),
                    repeated(scalar("tags", 3, Str)),
                    repeated(of("rules", 4, ".confluent.Rule")),
                ],
            );
            meta.nested_type = vec![entry];
            let rule = message(
                "Rule",
                vec![scalar("name", 1, Str), scalar("doc", 2, Str), scalar("expr", 3, Str), scalar("sql", 4, Str)],
            );
            let mut file = proto(name, "confluent", &["google/protobuf/descriptor.proto"], vec![meta, rule], vec![]);
            // Its options extensions: `[(confluent.field_meta) = {...}]` and the like.
            file.extension = ["File", "Message", "Field", "Enum", "EnumValue"]
                .into_iter()
                .map(|kind| {
                    let snake = match kind {
                        "EnumValue" => "enum_value".to_owned(),
                        k => k.to_lowercase(),
                    };
                    let mut e = of(&format!("{snake}_meta"), 1088, ".confluent.Meta");
                    e.extendee = Some(format!(".google.protobuf.{kind}Options"));
                    e
                })
                .collect();
            file
        }
        _ => return None,
    };
    Some(f)
}

fn proto(
    name: &str,
    package: &str,
    dependencies: &[&str],
    messages: Vec<DescriptorProto>,
    enums: Vec<EnumDescriptorProto>,
) -> FileDescriptorProto {
    FileDescriptorProto {
        name: Some(name.into()),
        package: Some(package.into()),
        dependency: dependencies.iter().map(|d| (*d).to_owned()).collect(),
        message_type: messages,
        enum_type: enums,
        syntax: Some("proto3".into()),
        ..Default::default()
    }
}

fn message(name: &str, fields: Vec<FieldDescriptorProto>) -> DescriptorProto {
    DescriptorProto { name: Some(name.into()), field: fields, ..Default::default() }
}

fn scalar(name: &str, number: i32, kind: Type) -> FieldDescriptorProto {
    FieldDescriptorProto {
        name: Some(name.into()),
        number: Some(number),
        label: Some(Label::Optional as i32),
        r#type: Some(kind as i32),
        json_name: None,
        ..Default::default()
    }
}

/// A field of message type `type_name` (fully qualified, with its leading dot).
fn of(name: &str, number: i32, type_name: &str) -> FieldDescriptorProto {
    FieldDescriptorProto { type_name: Some(type_name.into()), ..scalar(name, number, Type::Message) }
}

fn repeated(mut field: FieldDescriptorProto) -> FieldDescriptorProto {
    field.label = Some(Label::Repeated as i32);
    field
}

fn oneof(name: &str) -> OneofDescriptorProto {
    OneofDescriptorProto { name: Some(name.into()), options: None }
}

fn enumeration(name: &str, values: &[&str]) -> EnumDescriptorProto {
    EnumDescriptorProto {
        name: Some(name.into()),
        value: values
            .iter()
            .zip(0..)
            .map(|(v, number)| EnumValueDescriptorProto {
                name: Some((*v).into()),
                number: Some(number),
                options: None,
            })
            .collect(),
        ..Default::default()
    }
}
