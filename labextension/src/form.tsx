/**
 * The start form: JupyterLab's FormComponent (react-jsonschema-form) rendering the schema the
 * server serves (logic.ts derives the uiSchema), with two widgets of our own that give each input
 * its data-testid and an accessible name, and a select that keeps the choices' values (partition
 * names) as its option values.
 */
import { FormComponent, IFormComponentProps } from '@jupyterlab/ui-components';
import type { IChangeEvent } from '@rjsf/core';
import type { RegistryWidgetsType, RJSFSchema, UiSchema, WidgetProps } from '@rjsf/utils';
import { customizeValidator } from '@rjsf/validator-ajv8';
import React, { useMemo, useState } from 'react';

import { formSchema, IConfig, requestBody, StartRequest } from './logic';

export interface IStartFormProps {
  config: IConfig;
  /** A start request is on its way: the Start button is disabled. */
  busy: boolean;
  onStart: (body: StartRequest) => void;
}

type FormData = Record<string, unknown>;

/** FormComponent, for our form data (it is declared for read-only JSON only). */
const Form = FormComponent as unknown as (
  props: IFormComponentProps<FormData>
) => React.JSX.Element;
const validator = customizeValidator<FormData>();

export function StartForm({ config, busy, onStart }: IStartFormProps): React.JSX.Element {
  const { schema, uiSchema } = useMemo(() => formSchema(config), [config]);
  const [formData, setFormData] = useState<FormData>({});
  // FormComponent's field template reads formContext.defaultFormData (to mark modified fields).
  const formContext = useMemo(() => ({ defaultFormData: {} }), []);
  return (
    <Form
      schema={schema as RJSFSchema}
      uiSchema={uiSchema as UiSchema<FormData>}
      formData={formData}
      formContext={formContext}
      validator={validator}
      widgets={WIDGETS}
      idPrefix="spunnel"
      showModifiedFromDefault={false}
      onChange={(e: IChangeEvent<FormData>) => setFormData(e.formData ?? {})}
      onSubmit={(e: IChangeEvent<FormData>) => onStart(requestBody(schema, e.formData ?? {}))}
    >
      <button
        type="submit"
        className="jp-mod-styled jp-mod-accept"
        data-testid="spunnel-start"
        disabled={busy}
      >
        {busy ? 'Submitting…' : 'Start'}
      </button>
    </Form>
  );
}

/** Text and number inputs: react-jsonschema-form's own, plus a data-testid and an aria-label. */
function TextWidget(props: WidgetProps): React.JSX.Element {
  const BaseInputTemplate = props.registry.templates.BaseInputTemplate;
  return (
    <BaseInputTemplate
      {...props}
      data-testid={props.options.testId as string | undefined}
      aria-label={props.label}
    />
  );
}

/**
 * A single-choice select whose options carry the choices themselves as values (not their indexes,
 * as react-jsonschema-form's does), labelled by `ui:enumNames`.
 */
function SelectWidget(props: WidgetProps): React.JSX.Element {
  const { id, options, value, schema, disabled, readonly, required, placeholder, label } = props;
  const choices = (options.enumOptions ?? []).map(o => o.value as unknown);
  const names = (options.enumNames as string[] | undefined) ?? [];
  const enumDisabled = (options.enumDisabled as unknown[] | undefined) ?? [];
  const selected = choices.findIndex(c => c === value);
  const pick = (text: string) => {
    const i = choices.findIndex(c => String(c) === text);
    return i < 0 ? options.emptyValue : choices[i];
  };
  return (
    <select
      id={id}
      name={id}
      className="form-control"
      data-testid={options.testId as string | undefined}
      aria-label={label}
      value={selected < 0 ? '' : String(choices[selected])}
      required={required}
      disabled={disabled || readonly}
      onChange={e => props.onChange(pick(e.target.value))}
      onBlur={e => props.onBlur(id, pick(e.target.value))}
      onFocus={e => props.onFocus(id, pick(e.target.value))}
    >
      {schema.default === undefined && <option value="">{placeholder}</option>}
      {choices.map((c, i) => (
        <option key={String(c)} value={String(c)} disabled={enumDisabled.includes(c)}>
          {names[i] ?? String(c)}
        </option>
      ))}
    </select>
  );
}

const WIDGETS: RegistryWidgetsType = { TextWidget, SelectWidget };
