// Form fields derived from the API's own OpenAPI document, read at run time.

/** Resolve a "#/components/schemas/X" reference (or return the schema itself). */
export function resolveRef(openapi, schema) {
  if (schema && schema.$ref) {
    const name = schema.$ref.split("/").pop();
    return openapi.components.schemas[name];
  }
  return schema;
}

/**
 * One field description per property of a component schema:
 * {name, label, kind: integer|number|boolean|enum|text|list|choice-or-list, nullable,
 *  default, min, max, exclusiveMin, exclusiveMax, step, options, description; for lists
 *  minItems, maxItems, itemKind (string|integer|number|enum) and itemOptions}.
 */
export function fieldsFromSchema(openapi, componentName) {
  const schema = openapi.components.schemas[componentName];
  return Object.entries(schema.properties || {}).map(([name, raw]) =>
    describeField(name, resolveRef(openapi, raw), openapi),
  );
}

function describeField(name, prop, openapi) {
  const variants = (prop.anyOf || [prop]).map((v) => resolveRef(openapi, v));
  const nonNull = variants.filter((v) => v.type !== "null");
  const nullable = nonNull.length < variants.length;
  const field = {
    name,
    label: prop.title || name,
    description: prop.description || "",
    nullable,
    default: prop.default === undefined ? null : prop.default,
    options: null,
  };
  const enumVariant = nonNull.find((v) => Array.isArray(v.enum));
  const arrayVariant = nonNull.find((v) => v.type === "array");
  if (enumVariant && arrayVariant) {
    field.kind = "choice-or-list";
    field.options = enumVariant.enum;
    return field;
  }
  const main = nonNull[0] || {};
  if (Array.isArray(main.enum)) {
    field.kind = "enum";
    field.options = main.enum;
  } else if (main.type === "array") {
    field.kind = "list";
    field.maxItems = main.maxItems ?? null;
    field.minItems = main.minItems ?? null;
    const items = resolveRef(openapi, main.items) || {};
    field.itemKind = Array.isArray(items.enum) ? "enum" : items.type || "string";
    field.itemOptions = Array.isArray(items.enum) ? items.enum : null;
  } else if (main.type === "integer" || main.type === "number") {
    field.kind = main.type;
    field.min = main.minimum ?? null;
    field.max = main.maximum ?? null;
    field.exclusiveMin = main.exclusiveMinimum ?? null;
    field.exclusiveMax = main.exclusiveMaximum ?? null;
    field.step = main.multipleOf ?? (main.type === "integer" ? 1 : "any");
  } else if (main.type === "boolean") {
    field.kind = "boolean";
  } else {
    field.kind = "text";
  }
  return field;
}

/** The limits of a numeric field as words: "> 0, ≤ 1024". */
export function describeLimits(field) {
  const parts = [];
  if (field.min !== null && field.min !== undefined) parts.push(`≥ ${field.min}`);
  if (field.exclusiveMin !== null && field.exclusiveMin !== undefined) parts.push(`> ${field.exclusiveMin}`);
  if (field.max !== null && field.max !== undefined) parts.push(`≤ ${field.max}`);
  if (field.exclusiveMax !== null && field.exclusiveMax !== undefined) parts.push(`< ${field.exclusiveMax}`);
  if (typeof field.step === "number" && field.step !== 1) parts.push(`multiple of ${field.step}`);
  return parts.join(", ");
}

/**
 * Turn a form's raw string value into the JSON value for the field, or undefined to leave
 * the key out (empty input = the API's default).
 */
export function parseFieldValue(field, raw) {
  if (field.kind === "boolean") return Boolean(raw);
  const text = typeof raw === "string" ? raw.trim() : raw;
  if (text === "" || text === null || text === undefined) return undefined;
  switch (field.kind) {
    case "integer":
      return Number.parseInt(text, 10);
    case "number":
      return Number(text);
    case "list": {
      const items = text.split("\n").map((s) => s.trim()).filter(Boolean);
      if (field.itemKind === "integer") return items.map((s) => (/^-?\d+$/.test(s) ? Number(s) : s));
      if (field.itemKind === "number") return items.map((s) => (Number.isFinite(Number(s)) ? Number(s) : s));
      return items;
    }
    case "choice-or-list":
      return field.options.includes(text) ? text : text.split(",").map((s) => s.trim()).filter(Boolean);
    default:
      return text;
  }
}
