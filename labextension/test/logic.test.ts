/**
 * Unit tests of src/logic.ts, run by Node's own test runner on the compiled output
 * (npm test: tsc -p tsconfig.test.json && node --test build/test/test/logic.test.js).
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import {
  describeDetached,
  dueWarnings,
  duration,
  formSchema,
  IConfig,
  IFormSchema,
  IPartition,
  partitionLabel,
  requestBody,
  testId,
  timeLimitWarning
} from '../src/logic';

const INTERACT: IPartition = {
  name: 'interact',
  default: true,
  available: true,
  max_time: 8 * 3600,
  max_mem_mb: 8000,
  max_cpus: 16,
  nodes: 1
};
const DEBUG: IPartition = { ...INTERACT, name: 'debug', default: false, max_time: 3600, nodes: 2 };
const DOWN: IPartition = { ...DEBUG, name: 'down', available: false, max_time: null };

/** What spunnel_jupyter.fields.json_schema serves (site defaults: ui only). */
function served(): IFormSchema {
  return {
    type: 'object',
    title: 'Jupyter on a compute node',
    properties: {
      partition: {
        type: 'string',
        title: 'Partition',
        description: 'Slurm partition',
        enum: ['interact', 'debug', 'down']
      },
      mem: {
        type: 'string',
        title: 'Memory',
        description: 'memory per node, e.g. 4000 (MB) or 4G',
        examples: ['4G']
      },
      time: { type: 'string', title: 'Time limit', examples: ['2:00:00'] },
      cpus_per_task: { type: 'integer', title: 'CPUs', minimum: 1 },
      account: { type: 'string', title: 'Account' },
      ui: { type: 'string', title: 'Interface', enum: ['lab', 'notebook'], default: 'lab' }
    }
  };
}

function config(schema: IFormSchema = served()): IConfig {
  return { defaults: {}, partitions: [INTERACT, DEBUG, DOWN], schema };
}

describe('duration', () => {
  it('writes durations as Slurm does', () => {
    assert.equal(duration(0), '0:00');
    assert.equal(duration(59.9), '0:59');
    assert.equal(duration(600), '10:00');
    assert.equal(duration(3600), '1:00:00');
    assert.equal(duration(8 * 3600 + 61), '8:01:01');
    assert.equal(duration(86400 + 3661), '1-01:01:01');
  });

  it('shows a time already past as zero', () => {
    assert.equal(duration(-5), '0:00');
  });
});

describe('partitionLabel', () => {
  it('names the partition with its limits', () => {
    assert.equal(
      partitionLabel(INTERACT),
      'interact (default): up to 8:00:00, 8000 MB, 16 CPUs, 1 node'
    );
    assert.equal(partitionLabel(DEBUG), 'debug: up to 1:00:00, 8000 MB, 16 CPUs, 2 nodes');
    assert.equal(
      partitionLabel(DOWN),
      'down (unavailable): no time limit, 8000 MB, 16 CPUs, 2 nodes'
    );
  });
});

describe('testId', () => {
  it('is the first word of the field name', () => {
    assert.equal(testId('mem'), 'spunnel-mem');
    assert.equal(testId('cpus_per_task'), 'spunnel-cpus');
  });
});

describe('formSchema', () => {
  it('renders every served field, in order, and only those', () => {
    const { schema, uiSchema } = formSchema(config());
    const names = ['partition', 'mem', 'time', 'cpus_per_task', 'account', 'ui'];
    assert.deepEqual(Object.keys(schema.properties), names);
    assert.deepEqual(Object.keys(uiSchema), names);
    assert.equal(schema.title, undefined); // the panel has its own heading
  });

  it('shows a field the server adds without any change here', () => {
    const s = served();
    s.properties.qos = { type: 'string', title: 'QOS', description: 'quality of service' };
    const { schema, uiSchema } = formSchema(config(s));
    assert.deepEqual(schema.properties.qos, s.properties.qos);
    assert.deepEqual(uiSchema.qos['ui:options'], { testId: 'spunnel-qos' });
  });

  it('labels partitions with their limits and disables unavailable ones', () => {
    const { uiSchema } = formSchema(config());
    assert.deepEqual(uiSchema.partition['ui:enumNames'], [
      'interact (default): up to 8:00:00, 8000 MB, 16 CPUs, 1 node',
      'debug: up to 1:00:00, 8000 MB, 16 CPUs, 2 nodes',
      'down (unavailable): no time limit, 8000 MB, 16 CPUs, 2 nodes'
    ]);
    assert.deepEqual(uiSchema.partition['ui:enumDisabled'], ['down']);
  });

  it("preselects Slurm's default partition when the site sets none", () => {
    assert.equal(formSchema(config()).schema.properties.partition.default, 'interact');
  });

  it("keeps the site's default partition", () => {
    const s = served();
    s.properties.partition.default = 'debug';
    assert.equal(formSchema(config(s)).schema.properties.partition.default, 'debug');
  });

  it("replaces a default partition that is not offered with Slurm's", () => {
    const s = served();
    s.properties.partition.default = 'gone';
    assert.equal(formSchema(config(s)).schema.properties.partition.default, 'interact');
    const none = { ...config(s), partitions: [DEBUG] };
    assert.equal('default' in formSchema(none).schema.properties.partition, false);
  });

  it('keeps the other defaults, constraints and descriptions as served', () => {
    const { schema } = formSchema(config());
    assert.equal(schema.properties.ui.default, 'lab');
    assert.equal(schema.properties.cpus_per_task.minimum, 1);
    assert.equal(schema.properties.mem.description, 'memory per node, e.g. 4000 (MB) or 4G');
  });

  it('turns examples into placeholders', () => {
    const { schema, uiSchema } = formSchema(config());
    assert.equal(uiSchema.mem['ui:placeholder'], 'e.g. 4G');
    assert.equal(uiSchema.time['ui:placeholder'], 'e.g. 2:00:00');
    assert.equal('examples' in schema.properties.mem, false);
    assert.equal('ui:placeholder' in uiSchema.account, false);
  });

  it('keeps cleared text inputs empty, not choices or numbers', () => {
    const { uiSchema } = formSchema(config());
    assert.equal(uiSchema.mem['ui:emptyValue'], '');
    assert.equal('ui:emptyValue' in uiSchema.partition, false);
    assert.equal('ui:emptyValue' in uiSchema.cpus_per_task, false);
  });

  it('gives every input its test id', () => {
    const { uiSchema } = formSchema(config());
    assert.deepEqual(uiSchema.cpus_per_task['ui:options'], { testId: 'spunnel-cpus' });
    assert.deepEqual(uiSchema.partition['ui:options'], { testId: 'spunnel-partition' });
  });

  it('leaves the served config as it was', () => {
    const c = config();
    const before = JSON.stringify(c);
    formSchema(c);
    assert.equal(JSON.stringify(c), before);
  });
});

describe('requestBody', () => {
  const { schema } = formSchema(config());

  it('sends the filled fields, trimmed, integers as numbers', () => {
    const body = requestBody(schema, {
      partition: 'debug',
      mem: ' 1000 ',
      time: '10',
      cpus_per_task: 2,
      ui: 'notebook'
    });
    assert.deepEqual(body, {
      partition: 'debug',
      mem: '1000',
      time: '10',
      cpus_per_task: 2,
      ui: 'notebook'
    });
  });

  it('leaves out empty values', () => {
    const body = requestBody(schema, {
      partition: 'interact',
      mem: '',
      time: '   ',
      cpus_per_task: undefined,
      account: null
    });
    assert.deepEqual(body, { partition: 'interact' });
  });

  it('turns typed integers into numbers and sends the rest for the server to reject', () => {
    assert.deepEqual(requestBody(schema, { cpus_per_task: ' 4 ' }), { cpus_per_task: 4 });
    assert.deepEqual(requestBody(schema, { cpus_per_task: 0 }), { cpus_per_task: 0 });
    assert.deepEqual(requestBody(schema, { cpus_per_task: '1.5' }), { cpus_per_task: '1.5' });
  });

  it('sends only fields of the schema', () => {
    assert.deepEqual(requestBody(schema, { mem: '1G', bogus: 'x' }), { mem: '1G' });
  });
});

describe('describeDetached', () => {
  it('says where the job runs and where its tunnels are, as the CLI does', () => {
    const d = {
      job_id: 812,
      started_on: 'login1',
      state: 'RUNNING',
      node: 'c1',
      end_time: null,
      attached_on: ['login1', 'login2']
    };
    assert.equal(
      describeDetached(d),
      'Job 812 RUNNING on c1 (started on login1; tunnels on: login1, login2)'
    );
    assert.equal(
      describeDetached({ ...d, state: 'PENDING', node: '', attached_on: [] }),
      'Job 812 PENDING (started on login1; tunnels on: none)'
    );
  });
});

describe('time-limit warnings', () => {
  it('are due once each, when the time left crosses them, the largest first', () => {
    const given = new Set<number>();
    assert.deepEqual(dueWarnings([10, 1], given, 3600), []);
    assert.deepEqual(dueWarnings([10, 1], given, 599), [10]);
    given.add(10);
    assert.deepEqual(dueWarnings([10, 1], given, 300), []);
    assert.deepEqual(dueWarnings([10, 1], new Set(), 30), [10, 1]); // joined late: both
  });
  it('say what the terminal says', () => {
    assert.equal(
      timeLimitWarning(812, 61),
      'Job 812 reaches its time limit in 1 minute: save your work (the session saves open ' +
        'notebooks before it ends)'
    );
    assert.match(timeLimitWarning(812, 600), /in 10 minutes:/);
  });
});
